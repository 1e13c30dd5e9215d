"""The agent's command line: operator errors are one line and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
tenant = "demo"
machine = "web01"
process_server = "127.0.0.1:7443"
ca = "{d}/ca.pem"
cert = "{d}/a.pem"
key = "{d}/a.key"
state_dir = "{d}/state"
[[disks]]
id = "web01-disk0"
device = "{d}/disk.img"
"""


def run_agent(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (('machine = "web01"', 'machine = "Web_01"'), "machine 'Web_01' is not a valid id"),
        (('"127.0.0.1:7443"', '"no-port"'), "process_server must be host:port"),
        (("[[disks]]", "block_size = 1000\n[[disks]]"), "block_size must be a power of two"),
        (("[[disks]]", "window = 0\n[[disks]]"), "window must be greater than 0"),
        (
            ("[[disks]]", "sync_batch_bytes = 134217728\n[[disks]]"),
            "sync_batch_bytes must be at least block_size and at most 64 MiB",
        ),
        (("[[disks]]", 'tracker = "magic"\n[[disks]]'), "tracker must be auto, tracefs or scan"),
        (("[[disks]]", "speed = 3\n[[disks]]"), "unknown key speed"),
        (("[[disks]]", 'window = "8"\n[[disks]]'), "window must be an integer"),
        (('tenant = "demo"', 'tenant = "demo'), "not valid TOML"),
    ],
)
def test_bad_settings_give_one_line_and_exit_2(tmp_path, change, expected):
    text = GOOD.format(d=tmp_path).replace(*change)
    config = tmp_path / "agent.toml"
    config.write_text(text)
    result = run_agent(config)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("agent: error: invalid settings in"), lines[0]
    assert expected in lines[0]


def test_missing_device_is_one_line(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(GOOD.format(d=tmp_path))
    for name in ("ca.pem", "a.pem", "a.key"):
        (tmp_path / name).write_text("x")
    result = run_agent(config)
    assert result.returncode == 3, result.stderr
    assert (
        result.stderr.strip()
        == f"agent: error: cannot use {tmp_path}/disk.img: no such device or file"
    )


def test_missing_config_file(tmp_path):
    result = run_agent(tmp_path / "nope.toml")
    assert result.returncode == 2
    assert "file not found" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_failing_freeze_hook_is_a_ferry_error_with_the_no_tag_code():
    from agent.replicator import HookFailed, TagFailed, run_hook
    from ferry.errors import Exit

    with pytest.raises(HookFailed) as failed:
        run_hook("echo starting; echo database refused to quiesce >&2; exit 3", "pre", 10)
    assert str(failed.value) == (
        "the pre-freeze hook failed (exit status 3: database refused to quiesce); "
        "no app-consistent tag"
    )
    assert isinstance(failed.value, TagFailed) and failed.value.exit_code == Exit.NO_TAG == 9

    with pytest.raises(HookFailed, match=r"post-freeze hook failed \(still running after 0.3 s\)"):
        run_hook("sleep 5", "post", 0.3)
    run_hook("true", "pre", 10)  # a hook that succeeds raises nothing


def test_agent_commands_without_an_agent_are_one_line_and_retry_later(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ferrycli.main", "agent", "tag", "--socket", str(tmp_path / "no")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 75, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"ferry: error: cannot reach agent control socket {tmp_path / 'no'}: "
        "[Errno 2] No such file or directory"
    ]


@pytest.mark.parametrize("command", [["ferrycli.main", "agent", "status"], ["agent.fence", "tag"]])
def test_the_agent_is_found_by_its_state_directory(tmp_path, command):
    """`--state-dir` finds the control socket where the agent makes it (ferry.agentsocket)."""
    result = subprocess.run(
        [sys.executable, "-m", *command, "--state-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 75, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"cannot reach agent control socket {tmp_path / 'agent.sock'}" in line, line

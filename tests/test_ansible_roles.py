"""The Ansible roles' contracts that need no deployment: argument specs and early failures.

The playbooks run from the controller's own virtualenv (``.venv-controller``,
``requirements/controller.txt``), as an operator would run them.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ROLES = sorted(p.name for p in (ROOT / "roles").iterdir() if (p / "tasks").is_dir())
CONTROLLER = ROOT / ".venv-controller" / "bin"


def ansible_playbook(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ansible-playbook from the controller's virtualenv against the local inventory."""
    tool = CONTROLLER / "ansible-playbook"
    if not tool.exists():
        pytest.fail(f"{tool} is missing; `make setup` builds the controller's virtualenv")
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_FORCE_COLOR": "0", "PATH": f"{CONTROLLER}:{os.environ.get('PATH', '')}"}  # fmt: skip
    return subprocess.run(
        [str(tool), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def test_the_roles_of_the_design_are_all_here():
    wanted = {"storage", "config_server", "process_server", "mobility_agent", "master_target",
              "ferry_daemon", "cutover"}  # fmt: skip
    assert wanted <= set(ROLES)


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_mirror_the_defaults(role):
    defaults = set(load(ROOT / "roles" / role / "defaults" / "main.yml"))
    specs = load(ROOT / "roles" / role / "meta" / "argument_specs.yml")["argument_specs"]
    assert "main" in specs
    for entry, spec in specs.items():
        options = spec.get("options") or {}
        assert set(options) == defaults, f"{role}: entry point {entry} differs from defaults"
        for name, option in options.items():
            assert option.get("type"), f"{role}: {name} has no type"
            assert option.get("description"), f"{role}: {name} has no description"


@pytest.mark.parametrize("role", ROLES)
def test_role_variables_are_named_for_their_role(role):
    for name in load(ROOT / "roles" / role / "defaults" / "main.yml"):
        assert name.startswith(f"{role}_"), (
            f"{role}: public variable {name} lacks the role's prefix"
        )
    vars_file = ROOT / "roles" / role / "vars" / "main.yml"
    if vars_file.exists():
        for name in load(vars_file):
            assert name.startswith(f"_{role}_"), f"{role}: internal constant {name} lacks _{role}_"


def test_every_secret_option_is_hidden():
    for role in ROLES:
        specs = load(ROOT / "roles" / role / "meta" / "argument_specs.yml")["argument_specs"]
        for name, option in specs["main"]["options"].items():
            secret = ("passphrase", "token", "admin_key", "connection_string")
            if any(word in name for word in secret) and not name.endswith("_file"):
                assert option.get("no_log") is True, f"{role}: {name} must be no_log"


@pytest.fixture
def base(tmp_path) -> Path:
    """A deployment base that nothing else uses."""
    return tmp_path / "base"


@pytest.mark.parametrize(
    ("extra", "limit", "expected"),
    [
        (["process_server_port=ninety"], "ps01", "process_server_port"),
        (["mobility_agent_tracker=magic"], "web01", "mobility_agent_tracker"),
        (["storage_backend=s3"], "storage01", "storage_backend"),
    ],
)
def test_bad_variables_fail_argument_validation_with_a_typed_message(base, extra, limit, expected):
    args = ["playbooks/site.yml", "--check", "-l", limit, "-e", f"ferry_local_base={base}"]
    for item in extra:
        args += ["-e", item]
    result = ansible_playbook(*args)
    assert result.returncode != 0
    assert "Validation of arguments failed" in result.stdout
    assert expected in result.stdout
    assert not base.exists() or not any((base / "etc").glob("*.toml"))


def test_the_internal_role_refuses_to_run_on_its_own(tmp_path):
    play = tmp_path / "alone.yml"
    play.write_text(
        "- hosts: ps01\n  gather_facts: false\n  roles:\n    - role: ferry.migrate.ferry_daemon\n"
    )
    result = ansible_playbook(str(play), "--check", "-e", f"ferry_local_base={tmp_path}")
    assert result.returncode != 0
    assert "ferry_daemon_component" in result.stdout


def test_protect_fails_early_on_a_missing_device(base):
    result = ansible_playbook(
        "playbooks/protect.yml", "-l", "web01", "-e", f"ferry_local_base={base}",
        "-e", "ferry_local_disk=/dev/ferry-no-such-disk",
    )  # fmt: skip
    assert result.returncode != 0
    assert (
        "/dev/ferry-no-such-disk is missing or is not a block device or image file" in result.stdout
    )
    assert not (base / "lib").exists()


def test_protect_without_a_disk_says_what_to_name(base):
    result = ansible_playbook(
        "playbooks/protect.yml", "-l", "web01", "-e", f"ferry_local_base={base}"
    )
    assert result.returncode != 0
    said = " ".join(result.stdout.split())
    assert "web01 lists no disks to protect" in said and "-e ferry_local_disk=/dev/loopN" in said
    assert not (base / "lib").exists()


def test_cutover_needs_a_machine_name():
    result = ansible_playbook("playbooks/cutover.yml")
    assert result.returncode != 0
    assert "Name the machine to cut over: -e machine=" in result.stdout


def test_registration_stops_early_when_the_configuration_server_does_not_answer(base):
    from devkit.azurite import free_port

    url = f"http://127.0.0.1:{free_port()}"
    result = ansible_playbook(
        "playbooks/site.yml", "-l", "ps01", "-e", f"ferry_local_base={base}",
        "-e", f"ferry_config_server_url={url}", "-e", f"ferry_venv={ROOT / '.venv'}",
        "-e", "ferry_venv_managed=false",
    )  # fmt: skip
    assert result.returncode != 0
    said = " ".join(result.stdout.split())
    assert f"the configuration server at {url} does not answer" in said
    assert not (base / "etc" / "process-server.credentials.json").exists()


def ansible_debug(host: str, expression: str, *args: str) -> str:
    """The value of a Jinja expression for ``host`` of the local inventory, as Ansible sees it."""
    tool = CONTROLLER / "ansible"
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.minimal"}  # fmt: skip
    result = subprocess.run(
        [str(tool), host, "-m", "ansible.builtin.debug", "-a", f"msg={{{{ {expression} }}}}", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize(
    ("manager", "base", "units", "home"),
    [
        ("systemd", "/srv/ferry/run/ferry", "/etc/systemd/system", "true"),
        ("systemd", "/home/ann/ferry/run/ferry", "/etc/systemd/system", "read-only"),
        ("sysvinit", "/srv/ferry/run/ferry", "/srv/ferry/run/ferry/systemd", "true"),
    ],
)
def test_the_local_inventory_hands_units_to_systemd_only_where_it_is_pid_1(
    manager, base, units, home
):
    facts = json.dumps({"ansible_facts": {"service_mgr": manager}, "ferry_local_base": base})
    out = ansible_debug("ps01", "[ferry_systemd_dir, ferry_protect_home] | to_json", "-e", facts)
    assert f'["{units}", "{home}"]' in out

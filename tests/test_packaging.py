"""Packaging: each host installs only its part, from lock files; the roles ship as a collection.

pyproject.toml declares the core's dependencies and one extra per part; requirements/*.txt
are the pinned lock files made from them (`make lock`), which `make setup` and the roles
install.  The repository's root is also the Ansible collection ferry.migrate (galaxy.yml).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTROLLER = ROOT / ".venv-controller" / "bin"
COMPONENTS = ("agent", "processserver", "mastertarget", "functions", "ferrycli", "devkit")
PARTS = ("agent", "process-server", "master-target", "config-server", "cli", "controller", "dev")
AGENT_MUST_NOT_IMPORT = ("azure.functions", "uvicorn", "numpy")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def lock(part: str) -> dict[str, str]:
    """The pins of ``requirements/<part>.txt``: name -> version."""
    pins = {}
    for line in (ROOT / "requirements" / f"{part}.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements/{part}.txt: {line!r} is not pinned"
            pins[name_of(name)] = version
    return pins


def modules_after(code: str, python: str = sys.executable, cwd: Path = ROOT) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    done = subprocess.run(
        [python, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def import_all(package: str) -> str:
    """Code that imports every module of ``package`` (but runs no ``__main__``)."""
    return (
        f"import importlib, pkgutil, {package}\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    if not m.name.endswith('.__main__'):\n"
        "        importlib.import_module(m.name)"
    )


def test_importing_the_core_loads_no_component():
    loaded = modules_after(import_all("ferry"))
    assert "ferry.storage" in loaded and "ferry.control.client" in loaded  # the walk reached them
    components = sorted(m for m in loaded if m.split(".")[0] in COMPONENTS)
    assert components == []
    assert "numpy" not in loaded


def test_the_agent_loads_no_storage_sdk_numpy_or_server_stack():
    loaded = modules_after(import_all("agent"))
    assert "agent.managed" in loaded and "agent.replicator" in loaded
    unwanted = sorted(m for m in loaded if m.split(".")[0] in ("numpy", "uvicorn", "azure"))
    assert unwanted == []


@pytest.mark.parametrize("part", PARTS)
def test_every_part_has_a_lock_file_that_pins_its_extra(part):
    declared = project()["dependencies"] if part != "controller" else []
    declared = declared + project()["optional-dependencies"][part]
    pins = lock(part)
    for requirement in declared:
        if name_of(requirement) == "ferry":  # dev: every part, listed as ferry[...]
            continue
        assert name_of(requirement) in pins, f"requirements/{part}.txt lacks {requirement}"


def test_the_lock_files_agree_on_every_shared_pin():
    """The embedded default puts several parts in one virtualenv, one lock file after another."""
    runtime = ("agent", "process-server", "master-target", "config-server", "cli", "dev")
    seen: dict[str, tuple[str, str]] = {}
    for part in runtime:
        for name, version in lock(part).items():
            first = seen.setdefault(name, (version, part))
            assert first[0] == version, f"{name}: {first[1]} pins {first[0]}, {part} pins {version}"


def test_a_source_server_gets_no_functions_runtime_uvicorn_numpy_or_tables():
    pins = lock("agent")
    for name in ("azure-functions", "uvicorn", "numpy", "azure-data-tables", "ansible-core"):
        assert name not in pins


@pytest.mark.slow
def test_an_agent_only_install_runs_the_agent_without_the_rest(tmp_path):
    """`pip install '.[agent]'` in a fresh virtualenv, held to the agent's lock file.

    First the bare package (`pip install .`): its commands are installed, and
    each says in one line which part to install rather than a traceback.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    elsewhere = tmp_path / "elsewhere"  # not the checkout: only what was installed counts
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = {"cwd": elsewhere, "env": env, "capture_output": True, "text": True, "timeout": 120}

    def install(spec: str) -> None:
        subprocess.run(
            [python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "-c", str(ROOT / "requirements" / "agent.txt"), spec],
            check=True, timeout=900,
        )  # fmt: skip

    # Built once, installed twice: bare, then with the agent's extra.
    subprocess.run(
        [python, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True, timeout=600,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("ferry-*.whl")
    install(str(wheel))
    for command, extra in (("ferry", "cli"), ("ferry-agent", "agent"),
                           ("ferry-process-server", "process-server"),
                           ("ferry-master-target", "master-target")):  # fmt: skip
        bare = subprocess.run([str(venv / "bin" / command), "--help"], **run)
        assert bare.returncode == 17, (command, bare.stdout, bare.stderr)
        (line,) = bare.stderr.splitlines()
        assert line.startswith(f"{command}: ") and f"ferry[{extra}]" in line, line
    install(f"ferry[agent] @ {wheel.as_uri()}")
    helped = subprocess.run([python, "-m", "agent", "--help"], **run)
    assert helped.returncode == 0, helped.stderr
    assert "usage:" in helped.stdout
    ferry_help = subprocess.run([str(venv / "bin" / "ferry"), "--help"], **run)
    assert ferry_help.returncode == 0, ferry_help.stderr
    for module in (*AGENT_MUST_NOT_IMPORT, "devkit", "functions", "tests", "bench"):
        tried = subprocess.run([python, "-c", f"import {module}"], **run)
        assert tried.returncode != 0, f"{module} is importable in an agent-only install"
        assert "ModuleNotFoundError" in tried.stderr


def test_the_collection_builds_with_its_roles_and_module(tmp_path):
    tool = CONTROLLER / "ansible-galaxy"
    if not tool.exists():
        pytest.fail(f"{tool} is missing; `make setup` builds the controller's virtualenv")
    built = subprocess.run(
        [str(tool), "collection", "build", "--output-path", str(tmp_path), str(ROOT)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (tarball,) = tmp_path.glob("ferry-migrate-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
        manifest = json.load(tar.extractfile("MANIFEST.json"))["collection_info"]
    assert (manifest["namespace"], manifest["name"]) == ("ferry", "migrate")
    roles = {p.name for p in (ROOT / "roles").iterdir() if (p / "tasks").is_dir()}
    for role in roles:
        assert f"roles/{role}/tasks/main.yml" in names, role
    assert "plugins/modules/ferry_supervised.py" in names
    assert "meta/runtime.yml" in names
    # Only the Ansible side: hosts get the Python code from the lock files, not from here.
    stray = sorted(n for n in names if n.split("/")[0] in (*COMPONENTS, "ferry", "tests", ".venv"))
    assert stray == []

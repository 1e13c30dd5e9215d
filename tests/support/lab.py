"""The ``lab_machine`` fixture: one real Debian 12 guest under QEMU per test session.

Tests that use it are marked ``qemu`` (and ``root``: building the image needs
debootstrap and chroot). The guest is booted once from copy-on-write overlays
of the cached image (``python -m lab build``) and powered off at the end of the
session, whatever happened; scenarios share it, so a test that breaks the
guest must repair it. With FERRY_LAB_ATTACH=<run dir> (``python -m lab test``)
the fixture drives a machine that process booted, and leaves it running.

The object yielded is a :class:`lab.machine.Machine`: ``ssh(cmd)`` returns a
CompletedProcess (raises on failure unless ``check=False``), ``reboot()``,
``crash()``, ``copy_to(src, dest)``, ``console`` (serial log), ``overlays``
(disk name to qcow2 path), ``inventory`` (Ansible inventory), ``host_ports``
(host 127.0.0.1 ports the guest reaches as ``ferry-host``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.azurite import free_port
from devkit.wheelhouse import build as build_wheelhouse
from lab.cache import cache_root, ensure_image
from lab.machine import Machine
from mastertarget import cutover

ROOT = Path(__file__).resolve().parent.parent.parent

LONG = os.environ.get("FERRY_LAB_LONG") == "1"
"""``make lab`` (``python -m lab test``): the lab's long scenarios as well as those of make test."""

LAB_TIMEOUT = 1800
"""Seconds a qemu test may take: the first one may build the image (minutes) and boot it."""


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """qemu tests are root tests too, and get time for a cold image build."""
    for item in items:
        if "qemu" in item.keywords:
            item.add_marker(pytest.mark.root)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(LAB_TIMEOUT))


@pytest.fixture(scope="session")
def lab_machine(request, tmp_path_factory):
    attach = os.environ.get("FERRY_LAB_ATTACH")
    if attach:
        yield Machine.attach(Path(attach))
        return
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (deselect with -m 'not qemu')")
    if any("lab" in item.fixturenames for item in request.session.items):
        # A test will deploy Ferry on the guest: its wheelhouse is made meanwhile.
        WHEELHOUSE.start(tmp_path_factory.mktemp("wheelhouse") / "agent")
    machine = Machine(ensure_image(), tmp_path_factory.mktemp("lab"))
    with machine:
        yield machine


class Prebuilt:
    """The agent's wheelhouse, made in a thread while the guest boots and other tests run."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.dest: Path | None = None
        self.error: BaseException | None = None
        self.took = 0.0

    def start(self, dest: Path) -> None:
        self.dest = dest
        self.thread = threading.Thread(target=self._build, daemon=True)
        self.thread.start()

    def _build(self) -> None:
        started = time.monotonic()
        try:
            build_wheelhouse(self.dest, ["agent"], cache_root() / "wheels")
        except BaseException as e:  # handed to the test that needs it
            self.error = e
        self.took = time.monotonic() - started

    def copy_to(self, dest: Path) -> float | None:
        """Put the prebuilt wheelhouse at ``dest``; its build time, or None if none was made."""
        if self.thread is None:
            return None
        self.thread.join()
        if self.error is not None:
            raise self.error
        shutil.copytree(self.dest, dest)
        return self.took


WHEELHOUSE = Prebuilt()


# -- Ferry deployed on the lab ---------------------------------------------------------------

CONTROLLER = ROOT / ".venv-controller" / "bin"
LAB_INVENTORY = ROOT / "inventory" / "lab"
GUEST_FERRY = "/opt/ferry/venv/bin/ferry"
GUEST_AGENT_STATE = "/var/lib/ferry/agent"
LAB_DISKS = {"lab01-sys": "/dev/disk/by-id/virtio-ferry-sys",
             "lab01-data": "/dev/disk/by-id/virtio-ferry-data"}  # fmt: skip
"""The guest's disks as inventory/lab protects them: whole disks, by the serial QEMU gives."""


def mitogen_strategy() -> dict[str, str]:
    """The environment that runs a playbook with Mitogen's strategy (docs/lab.md).

    A module run in the emulated guest costs about 4 s with Ansible's own
    strategy (a new interpreter that compiles Ansible's module code each
    time) and well under a second with Mitogen's, which keeps one interpreter
    in the guest. ``FERRY_LAB_STRATEGY=linear`` runs the lab with Ansible's own.
    """
    if os.environ.get("FERRY_LAB_STRATEGY") == "linear":
        return {}
    found = sorted(
        CONTROLLER.parent.glob("lib/python3*/site-packages/ansible_mitogen/plugins/strategy")
    )
    if not found:
        raise AssertionError("mitogen is not in the controller's virtualenv: run make setup")
    return {"ANSIBLE_STRATEGY_PLUGINS": str(found[-1]), "ANSIBLE_STRATEGY": "mitogen_linear"}


class LabDeployment:
    """Ferry deployed on a lab machine with the operator's playbooks.

    The inventory is ``inventory/lab`` plus the machine's own (its SSH port
    and key): the agent in the guest under systemd, installed from a
    wheelhouse made here; storage, the configuration server, the process
    server and the master target on this machine under ferry-supervise, all
    with their files in ``base/ferry`` and ports of their own (the process
    server on the machine's first forwarded port, as ``ferry-host``).
    """

    def __init__(self, machine: Machine, base: Path) -> None:
        self.machine = machine
        self.base = Path(base)
        self.ferry = self.base / "ferry"
        self.extra = self.base / "extra.json"
        self.extra.write_text(json.dumps(self.variables(), indent=1))
        # This machine's daemons run from the development virtualenv as it is (host
        # variables: extra variables would reach the guest too).
        here = {"ferry_venv": str(ROOT / ".venv"), "ferry_venv_managed": False}
        hosts = dict.fromkeys(("storage01", "config01", "ps01", "mt01"), here)
        self.controller = self.base / "controller.json"
        self.controller.write_text(json.dumps(
            {"all": {"children": {"ferry_lab_controller": {"hosts": hosts}}}}, indent=1
        ))  # fmt: skip
        self.timings: dict[str, float] = {}

    def variables(self) -> dict:
        return {
            "ferry_local_base": str(self.ferry),
            "storage_azurite_blob_port": free_port(),
            "storage_azurite_queue_port": free_port(),
            "storage_azurite_table_port": free_port(),
            "config_server_port": free_port(),
        }

    @property
    def wheelhouse(self) -> Path:
        return self.ferry / "wheelhouse"  # where inventory/lab's ferry_wheelhouse points

    def make_wheelhouse(self) -> None:
        started = time.monotonic()
        prebuilt = WHEELHOUSE.copy_to(self.wheelhouse)
        if prebuilt is None:
            build_wheelhouse(self.wheelhouse, ["agent"], cache_root() / "wheels")
        self.timings["wheelhouse_s"] = prebuilt or time.monotonic() - started

    def playbook(self, name: str, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        """Run ``playbooks/<name>`` on the lab inventory; its output is kept in ``base``."""
        env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_FORCE_COLOR": "0", "PATH": f"{CONTROLLER}:{os.environ.get('PATH', '')}",
               **mitogen_strategy()}  # fmt: skip
        cmd = [str(CONTROLLER / "ansible-playbook"), f"playbooks/{name}", *self.inventory_args(),
               "-e", f"@{self.extra}", *args]  # fmt: skip
        started = time.monotonic()
        result = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        self.timings[name] = time.monotonic() - started
        log = self.base / f"{name}.{time.monotonic_ns()}.log"
        log.write_text(result.stdout + result.stderr)
        return result

    def inventory_args(self) -> list[str]:
        return [
            "-i",
            str(LAB_INVENTORY),
            "-i",
            str(self.machine.inventory),
            "-i",
            str(self.controller),
        ]

    def ok(self, name: str, *args: str) -> subprocess.CompletedProcess:
        result = self.playbook(name, *args)
        if result.returncode != 0:
            raise AssertionError(
                f"{name} failed (logs in {self.base}):\n{result.stdout[-4000:]}{result.stderr[-2000:]}"
            )
        return result

    def agent(self, *args: str, timeout: float = 300) -> str:
        """``ferry agent ARGS`` in the guest (the deployed virtualenv's command)."""
        socket = f"{GUEST_AGENT_STATE}/agent.sock"
        quoted = " ".join(shlex.quote(a) for a in args)
        return self.machine.ssh(
            f"{GUEST_FERRY} agent {quoted} --socket {socket}", timeout=timeout
        ).stdout

    def status(self) -> dict:
        """The agent's status (``ferry agent status --json`` in the guest)."""
        return json.loads(self.agent("status", "--json", timeout=60))

    def cursor(self, disk: str) -> dict:
        """The master target's durable cursor for ``disk`` on this machine."""
        return cutover.read_cursor(self.ferry / "lib" / "master-target", disk)

    def target(self, disk: str) -> Path:
        """The master target's image of ``disk``."""
        return self.ferry / "lib" / "targets" / f"{disk}.img"  # master_target_targets_dir

    def seed_targets(self) -> None:
        """Give the master target a copy of the disks the guest booted from, before protect.yml.

        An operator does the same with a restored backup (offline seeding): the
        first protection then finds a target that is not empty, compares digests
        and ships only what changed since (the guest's boot, site.yml's
        install). Unseeded, the system disk's first sync ships about 500 MiB
        through the guest's emulated CPU (minutes); ``make lab`` measures that.
        """
        started = time.monotonic()
        targets = self.ferry / "lib" / "targets"
        targets.mkdir(parents=True, exist_ok=True)
        for disk, base in (("lab01-sys", self.machine.image.system),
                           ("lab01-data", self.machine.image.data)):  # fmt: skip
            subprocess.run(["cp", "--sparse=always", str(base), str(self.target(disk))], check=True)
        self.timings["seed_s"] = time.monotonic() - started

    def teardown(self) -> None:
        self.playbook("teardown.yml", "-e", "ferry_teardown_purge=true", timeout=600)


@contextlib.contextmanager
def protected_lab(machine: Machine, base: Path, seed: bool = False) -> Iterator[LabDeployment]:
    """A lab machine protected and replicating, deployed as an operator would deploy it.

    ``site.yml`` then ``protect.yml`` on ``inventory/lab`` (see
    :class:`LabDeployment`): on return both guest disks (``LAB_DISKS``) sit on
    their first recovery point and the agent in the guest runs under
    systemd. ``teardown.yml`` with purge runs at the end whatever happened,
    so the guest can be deployed again in the same session. Use it once per
    module on the session's ``lab_machine``::

        @pytest.fixture(scope="module")
        def lab(lab_machine, tmp_path_factory):
            with protected_lab(lab_machine, tmp_path_factory.mktemp("lab-ferry")) as lab:
                yield lab

    With ``seed`` the master target's targets start as copies of the image's
    disks (:meth:`LabDeployment.seed_targets`): the first sync is a digest
    comparison that ships only the differences.

    Playbook outputs are kept in ``base`` (``<playbook>.<ns>.log``).
    """
    deployment = LabDeployment(machine, base)
    try:
        deployment.make_wheelhouse()
        deployment.ok("site.yml")
        if seed:
            deployment.seed_targets()
        deployment.ok("protect.yml")
        yield deployment
    finally:
        deployment.teardown()

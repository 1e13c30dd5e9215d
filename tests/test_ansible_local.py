"""The playbooks for real on the local inventory: deploy, protect, test failover, cut over.

One deployment per module (its own base directory, ports and machine id, so
nothing collides with other tests), driven by the README's own commands: its
Ansible table's ``site.yml`` with no disk named yet, then ``protect.yml -e
ferry_local_disk=/dev/loopN`` for a loop device with ext4, while a writer
changes files; a test failover is made and
cleaned up, the machine is cut over and the VHD checked, and everything is
torn down.  In file order each test takes the deployment on from the one
before, as an operator's session does; run alone, a test first brings the
deployment to the stage it needs (``deployed``, ``protected``, ``cut_over``
fixtures) with the same playbooks.

The daemons register with the configuration server and run in server mode,
as the local inventory has them; ``FERRY_TEST_SETTINGS_MODE=1`` runs the
same tests with the daemons on settings files instead.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from support import wait_for
from support.disks import LoopDisk, release_all

from devkit.azurite import free_port
from devkit.embedded import copy_tree_sample
from ferry import naming
from ferry.storage import Storage
from mastertarget import cutover

# Run alone, a test first runs the playbooks of the stages before its own: up to four.
pytestmark = [pytest.mark.root, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
CONTROLLER = ROOT / ".venv-controller" / "bin"
MiB = 1 << 20
SERVER_MODE = os.environ.get("FERRY_TEST_SETTINGS_MODE") != "1"
STAGES = ("deployed", "protected", "cut-over")
"""What the playbooks bring a deployment to, in the order they do."""
README_ROWS = {
    "deployed": "deploy everything for an inventory",
    "protected": "protect a source's disks",
}
"""The README's Ansible table: the rows whose commands bring a deployment to these stages."""
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def readme_command(row: str) -> list[str]:
    """The playbook and arguments of the README's Ansible table row ``row``, as written."""
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 2 and cells[0] == row:
            command = re.findall(r"`([^`]+)`", cells[1])[0].split()
            assert command[0] == ".venv-controller/bin/ansible-playbook", command
            assert command[1].startswith("playbooks/"), command
            return [command[1].removeprefix("playbooks/"), *command[2:]]
    raise AssertionError(f"README.md has no Ansible table row {row!r}")


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


class Deployment:
    """The local inventory, pointed at a base directory of its own."""

    def __init__(self, base: Path, device: str, mountpoint: Path) -> None:
        self.base = base
        self.machine = "t" + uuid.uuid4().hex[:8]
        self.disk = f"{self.machine}-disk0"
        self.device = device
        self.mountpoint = mountpoint
        self.extra = base / "extra.yml"
        self.hook_mark = base / "pre-cutover-hook-ran"
        self.extra.write_text(yaml.safe_dump(self.variables()))
        self.stage: str | None = None  # the last of STAGES reached (None: not deployed)
        self.failed: set[str] = set()  # stages whose playbook failed: not tried again

    def variables(self) -> dict:
        return {
            "ferry_local_base": str(self.base / "ferry"),
            # The development virtualenv, as it is: installing a new one is
            # what a real host does (and slow); the role then only uses it.
            "ferry_venv": str(ROOT / ".venv"),
            "ferry_venv_managed": False,
            # No disk here: the README's protect.yml names it (steps).
            "mobility_agent_machine": self.machine,
            "storage_azurite_blob_port": free_port(),
            "storage_azurite_queue_port": free_port(),
            "storage_azurite_table_port": free_port(),
            "config_server_port": free_port(),
            "process_server_port": free_port(),
            "cutover_pre_hooks": [f"touch {self.hook_mark}"],
            "cutover_progress_interval": 2,
        } | ({} if SERVER_MODE else {"ferry_config_server_url": ""})

    @property
    def state(self) -> Path:
        return self.base / "ferry" / "lib"

    def playbook(self, name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_FORCE_COLOR": "0", "PATH": f"{CONTROLLER}:{os.environ.get('PATH', '')}",
               # Every inventory host is this machine: gather its facts once per module.
               "ANSIBLE_GATHERING": "smart", "ANSIBLE_CACHE_PLUGIN": "ansible.builtin.jsonfile",
               "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(self.base / "facts")}  # fmt: skip
        cmd = [str(CONTROLLER / "ansible-playbook"), f"playbooks/{name}", "-e", f"@{self.extra}"]
        result = subprocess.run(
            [*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        (self.base / f"{name}.{time.monotonic_ns()}.log").write_text(result.stdout + result.stderr)
        return result

    def ok(self, name: str, *args: str) -> subprocess.CompletedProcess:
        result = self.playbook(name, *args)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        return result

    def steps(self, stage: str) -> list[str]:
        """The playbook and arguments that bring the deployment to ``stage``: the README's."""
        if stage == "cut-over":
            return ["cutover.yml", "-e", "machine=web01"]
        return [a.replace("/dev/loopN", self.device) for a in readme_command(README_ROWS[stage])]

    def step(self, stage: str, *extra: str) -> subprocess.CompletedProcess:
        """Run the playbook that brings the deployment to ``stage`` (once: a failure sticks)."""
        if stage in self.failed:
            pytest.fail(
                f"{self.steps(stage)[0]} failed earlier in this module (logs in {self.base})"
            )
        try:
            result = self.ok(*self.steps(stage), *extra)
        except AssertionError:
            self.failed.add(stage)
            raise
        if self.stage is None or STAGES.index(stage) > STAGES.index(self.stage):
            self.stage = stage
        return result

    def reach(self, stage: str) -> None:
        """Bring the deployment to ``stage`` with the operator's playbooks, if not there yet."""
        have = -1 if self.stage is None else STAGES.index(self.stage)
        if have > STAGES.index(stage) and stage != "deployed":
            pytest.fail(f"the deployment is {self.stage} already: it cannot be {stage} again")
        for step in STAGES[have + 1 : STAGES.index(stage) + 1]:
            self.step(step)

    def running(self) -> set[str]:
        """The components whose supervisor is alive."""
        return set(self.daemons())

    def daemons(self) -> dict[str, int | None]:
        """Each component whose supervisor is alive, and the process id of its daemon."""
        found = {}
        for pidfile in (self.base / "ferry" / "run").glob("*.pid"):
            try:
                state = json.loads(pidfile.read_text())
            except (OSError, ValueError):
                continue  # being rewritten
            if Path(f"/proc/{state['pid']}").exists():
                found[pidfile.stem] = state.get("child")
        return found

    def agent_status(self) -> dict:
        out = run(str(ROOT / ".venv" / "bin" / "ferry"), "agent", "status", "--json",
                  "--socket", str(self.state / "agent" / "agent.sock"))  # fmt: skip
        return json.loads(out)

    def cursor(self) -> dict:
        return cutover.read_cursor(self.state / "master-target", self.disk)

    def api(self, path: str) -> dict:
        """GET from the configuration server as the tenant's operator."""
        import requests

        token = (self.base / "ferry" / "controller" / "secrets" / "operator-token").read_text()
        port = yaml.safe_load(self.extra.read_text())["config_server_port"]
        answer = requests.get(f"http://127.0.0.1:{port}{path}", timeout=10,
                              headers={"Authorization": f"Bearer {token.strip()}"})  # fmt: skip
        answer.raise_for_status()
        return answer.json()

    def storage(self) -> Storage:
        return Storage((self.base / "ferry" / "etc" / "storage.connection").read_text().strip())


def changes(result: subprocess.CompletedProcess) -> dict[str, int]:
    return {m[1]: int(m[3]) for m in RECAP.finditer(result.stdout)}


class Writer(threading.Thread):
    """Rewrites and appends files on the source filesystem until stopped."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root / "live"
        self.root.mkdir(exist_ok=True)
        self.halt = threading.Event()
        self.writes = 0
        self.rng = random.Random(3)

    def run(self) -> None:
        while not self.halt.is_set():
            with open(self.root / f"f{self.rng.randrange(50):02d}.bin", "wb") as f:
                f.write(self.rng.randbytes(self.rng.choice([4096, 65536, 262144])))
            with open(self.root / "journal.log", "a") as f:
                f.write(f"{time.time():.6f} write {self.writes}\n")
            self.writes += 1
            self.halt.wait(0.02)

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    base = tmp_path_factory.mktemp("ansible-local")
    disk = LoopDisk.new(base, 256 * MiB, fs=True)
    copy_tree_sample(disk.mountpoint, 40 * MiB)
    os.sync()
    deployment = Deployment(base, disk.device, disk.mountpoint)
    try:
        yield deployment
    finally:
        try:
            if deployment.running():  # a test failed before test_teardown_stops_everything
                deployment.playbook("teardown.yml")
        finally:
            release_all([disk])


@pytest.fixture
def deployed(deployment) -> Deployment:
    """The deployment after ``site.yml`` (or later)."""
    deployment.reach("deployed")
    return deployment


@pytest.fixture
def protected(deployment) -> Deployment:
    """The deployment replicating the loop device (``protect.yml``), not cut over."""
    deployment.reach("protected")
    return deployment


@pytest.fixture
def cut_over(deployment) -> Deployment:
    """The deployment after the machine's cutover (``cutover.yml``)."""
    deployment.reach("cut-over")
    return deployment


def test_site_deploys_every_role_and_shows_no_secret_even_at_vvv(deployment):
    # The README's first command, on a machine where no disk is named yet, at -vvv:
    # the run that makes and hands out every secret prints none of them.
    assert deployment.steps("deployed") == ["site.yml"]
    result = deployment.step("deployed", "-vvv")
    output = result.stdout + result.stderr
    secrets = deployment.base / "ferry" / "controller" / "secrets"
    for name in ("ca-passphrase", "operator-token", "admin-key"):
        assert secrets.joinpath(name).read_text().strip() not in output, name
    etc = deployment.base / "ferry" / "etc"
    account_key = re.search(r"AccountKey=([^;]+)", (etc / "storage.connection").read_text())[1]
    assert account_key not in output
    if SERVER_MODE:
        for name in ("agent", "process-server", "master-target"):
            token = json.loads((etc / f"{name}.credentials.json").read_text())["token"]
            assert token not in output, name
    else:
        for name in ("process-server", "master-target"):
            assert (etc / f"{name}.segment.key").read_text().strip() not in output, name
    assert {"azurite", "config-server", "process-server"} <= deployment.running()
    # Its environment file runs the process server with its heap in huge pages
    # (ferry/memory.py); an agent never.
    daemon = deployment.daemons()["process-server"]
    environ = Path(f"/proc/{daemon}/environ").read_bytes().split(b"\0")
    assert b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in environ
    assert "GLIBC_TUNABLES" not in (etc / "agent.env").read_text()
    if SERVER_MODE:
        # Registered, and waiting for the configuration server to protect something.
        assert {"agent", "master-target"} <= deployment.running()
        for name in ("agent", "process-server", "master-target"):
            assert (etc / f"{name}.credentials.json").stat().st_mode & 0o777 == 0o600
        kinds = {c["kind"] for c in deployment.api("/tenants/demo/status")["components"]}
        assert kinds == {"agent", "process-server", "master-target"}
        (machine,) = deployment.api("/tenants/demo/machines")["machines"]
        assert machine["machine"] == deployment.machine and machine["disks"] == []
    else:
        # Sealed segments need the deployment's key on both sides, written 0600.
        for name in ("process-server", "master-target"):
            key = etc / f"{name}.segment.key"
            assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_text().strip()) == 64
        # Nothing is protected yet: the agent and the master target wait for protect.yml.
        assert not {"agent", "master-target"} & deployment.running()
    assert (deployment.base / "ferry" / "controller" / "pki" / "ca.pem").exists()
    connection = deployment.base / "ferry" / "etc" / "storage.connection"
    assert connection.stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.usefixtures("deployed")
def test_the_systemd_units_written_for_real_hosts_are_valid(deployment):
    # systemd is not PID 1 here, so the units are not run; systemd itself still
    # parses each one as a host would and names any key or value it rejects.
    units = sorted((deployment.base / "ferry" / "systemd").glob("*.service"))
    assert {u.name for u in units} >= {
        "ferry-process-server.service", "ferry-master-target.service", "ferry-agent.service"
    }  # fmt: skip
    for unit in units:
        result = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        complaints = [
            line for line in (result.stdout + result.stderr).splitlines() if str(unit) in line
        ]
        assert result.returncode == 0 and not complaints, (unit.name, result.stderr)
        text = unit.read_text()
        assert "NoNewPrivileges=true" in text and "ProtectSystem=strict" in text


@pytest.mark.usefixtures("deployed")
def test_check_mode_says_what_it_would_change_and_touches_nothing(deployment):
    cert = deployment.base / "ferry" / "etc" / "pki" / "process-server.pem"
    before = cert.read_bytes()
    pidfile = deployment.base / "ferry" / "run" / "process-server.pid"
    pid = json.loads(pidfile.read_text())["pid"]
    result = deployment.ok(
        "site.yml", "--check", "--diff", "-l", "ps01",
        "-e", '{"process_server_cert_hosts": ["localhost", "127.0.0.1", "ps01.example.net"]}',
    )  # fmt: skip
    said = " ".join(result.stdout.split())
    assert changes(result)["ps01"] > 0
    assert "changed: [ps01]" in result.stdout
    assert "process-server: running (settings changed since start)" in said
    assert cert.read_bytes() == before
    assert json.loads(pidfile.read_text())["pid"] == pid


class AgentWatch(threading.Thread):
    """Notes the agent's process id when it first reports a disk: its initial sync began."""

    def __init__(self, deployment: Deployment) -> None:
        super().__init__(daemon=True)
        self.deployment = deployment
        self.halt = threading.Event()
        self.pid_at_sync: int | None = None

    def run(self) -> None:
        while not self.halt.is_set() and self.pid_at_sync is None:
            pid = self.deployment.daemons().get("agent")
            try:
                disks = self.deployment.agent_status()["disks"]
            except (subprocess.CalledProcessError, ValueError):
                disks = []  # not up yet, or being restarted
            if disks and pid is not None and pid == self.deployment.daemons().get("agent"):
                self.pid_at_sync = pid
            self.halt.wait(0.2)

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


@pytest.mark.usefixtures("deployed")
def test_protect_replicates_the_loop_device(deployment):
    # The README's second command, with this module's loop device for /dev/loopN.
    assert deployment.steps("protected") == [
        "protect.yml",
        "-e",
        f"ferry_local_disk={deployment.device}",
    ]
    watch = AgentWatch(deployment)
    watch.start()
    try:
        deployment.step("protected")
    finally:
        watch.stop()
    assert {"agent", "master-target"} <= deployment.running()
    status = deployment.agent_status()
    assert [(d["disk"], d["phase"]) for d in status["disks"]] == [(deployment.disk, "replicating")]
    assert deployment.cursor()["last_tag"]
    # Nothing restarted the agent once its initial sync had begun (a restart costs a full resync).
    assert watch.pid_at_sync is not None
    assert deployment.daemons()["agent"] == watch.pid_at_sync
    if SERVER_MODE:  # the disk protect.yml named reached the configuration server
        (machine,) = deployment.api("/tenants/demo/machines")["machines"]
        assert [(d["id"], d["device"]) for d in machine["disks"]] == [
            (deployment.disk, deployment.device)
        ]


@pytest.mark.usefixtures("protected")
def test_a_second_protect_or_site_run_changes_nothing_and_restarts_no_daemon(deployment):
    before = deployment.daemons()
    assert {"azurite", "config-server", "process-server", "master-target", "agent"} <= set(before)
    for command in (deployment.steps("protected"), ["site.yml"]):
        result = deployment.ok(*command)
        assert changes(result) and not any(changes(result).values()), (command, changes(result))
    assert deployment.daemons() == before


@pytest.mark.usefixtures("protected")
def test_test_failover_clones_while_replication_goes_on(deployment):
    since = deployment.cursor()["last_tag"]["t0_mono_ns"]
    writer = Writer(deployment.mountpoint)
    writer.start()
    try:
        wait_for(
            lambda: writer.writes >= 20 and deployment.cursor()["last_tag"]["t0_mono_ns"] > since,
            60,
            "changed files replicated before the test failover",
        )
        out_dir = deployment.base / "ferry" / "cutover" / "test-failover" / deployment.machine
        result = deployment.ok("test_failover.yml", "-e", "machine=web01")
        record = json.loads((out_dir / "test-failover.json").read_text())
        vhd = Path(record["made"][0])
        assert cutover.qemu_info(vhd)["virtual-size"] == 256 * MiB
        assert record["disks"][0]["fsck"]["clean"] is True
        assert "at tag" in result.stdout and "applying held" in " ".join(result.stdout.split())
        # Replication never paused: the target moves past the clone's tag.
        cloned = record["disks"][0]["tag"]["t0_mono_ns"]
        deadline = time.monotonic() + 60
        while deployment.cursor()["last_tag"]["t0_mono_ns"] <= cloned:
            assert time.monotonic() < deadline, "the target did not move after the test failover"
            time.sleep(0.5)
        assert [d["phase"] for d in deployment.agent_status()["disks"]] == ["replicating"]
        (out_dir / "operator-notes.txt").write_text("not made by the test failover")
        deployment.ok("test_failover_cleanup.yml", "-e", "machine=web01")
        assert sorted(p.name for p in out_dir.iterdir()) == ["operator-notes.txt"]
        again = deployment.ok("test_failover_cleanup.yml", "-e", "machine=web01")
        assert not any(changes(again).values())
        if SERVER_MODE:
            jobs = deployment.api("/tenants/demo/jobs")["jobs"]
            assert [j["state"] for j in jobs if j["kind"] == "test-failover"] == ["cleaned"]
    finally:
        writer.stop()


@pytest.mark.usefixtures("protected")
def test_a_cutover_whose_boot_check_fails_is_not_committed_and_replication_resumes(deployment):
    # The loop device holds a bare filesystem, no operating system: the boot
    # check (asked for here, off in the local inventory) fails on its own.
    writer = Writer(deployment.mountpoint)
    writer.start()
    try:
        time.sleep(2)
        failed = deployment.playbook("cutover.yml", "-e", "machine=web01",
                                     "-e", "cutover_boot_check=true")  # fmt: skip
        said = " ".join(failed.stdout.split())
        assert failed.returncode != 0, said[-3000:]
        assert f"{deployment.machine} is not cut over: boot check: no operating system" in said
        manifest_path = deployment.base / "ferry" / "cutover" / deployment.machine / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        assert manifest["verified"] and not manifest["complete"]
        final = manifest["final_tag"]["id"]
        assert deployment.cursor()["fenced"]["tag"]["id"] == final
        assert "agent" not in deployment.running()
        if SERVER_MODE:
            machines = deployment.api("/tenants/demo/machines")["machines"]
            assert [m["state"] for m in machines if m["machine"] == deployment.machine] != [
                "cut-over"
            ]
        # The operator resumes replication instead of fixing the source.
        resumed = deployment.ok("cutover.yml", "-e", "machine=web01", "-e", "cutover_action=resume")
        said = " ".join(resumed.stdout.split())
        assert f"the cutover at tag {final} was not committed (boot check: no operating" in said
        assert "replication resumed" in said
        assert "agent" in deployment.running()
        wait_for(
            lambda: deployment.cursor()["last_tag"]["id"] != final,
            120,
            "a tag after the uncommitted cutover's final tag applied",
        )
        cursor = deployment.cursor()
        assert cursor["fenced"] is None and cursor["resumed"]["tag"] == final
        fence = f"demo/{deployment.disk}/fence.json"
        assert not deployment.storage().exists(
            naming.control_container("demo", deployment.disk), fence
        )
        assert [d["phase"] for d in deployment.agent_status()["disks"]] == ["replicating"]
        if not SERVER_MODE:  # the master target's own record (server mode: the command's outcome)
            history = json.loads((manifest_path.parent / "resumed.json").read_text())["resumed"]
            assert [d["was_fenced_at"] for d in history[-1]["disks"]] == [final]
    finally:
        writer.stop()


@pytest.mark.usefixtures("protected")
def test_cutover_migrates_the_machine_to_a_verified_vhd(deployment):
    writer = Writer(deployment.mountpoint)
    writer.start()
    try:
        time.sleep(3)
        result = deployment.step("cut-over")
    finally:
        writer.stop()
    assert writer.writes > 10
    assert deployment.hook_mark.exists(), "the pre-cutover hook did not run"
    said = " ".join(result.stdout.split())  # the callback folds long messages
    assert re.search(r"\d+ s\] \S+-disk0: gen \d+ seq \d+, \d+ staged, at the final tag", said)
    assert re.search(r"disks ready [\d.]+ s after the cutover started", said)
    out = deployment.base / "ferry" / "cutover" / deployment.machine
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verified"] and manifest["machine"] == deployment.machine
    (disk,) = manifest["disks"]
    assert disk["expected_sha256"] == disk["data_sha256"]
    vhd = Path(disk["vhd"])
    assert vhd.stat().st_size == 256 * MiB + 512
    info = cutover.qemu_info(vhd)
    assert info["format"] == "vpc" and info["virtual-size"] == 256 * MiB
    fsck = subprocess.run(["e2fsck", "-fn", str(vhd)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    # Fenced: the agent is gone for good, the master target let go of the disk,
    # and storage records that nothing after the final tag may be applied.
    assert "agent" not in deployment.running()
    assert json.loads((deployment.state / "agent" / "protected.json").read_text())["fenced"]
    if SERVER_MODE:
        machines = deployment.api("/tenants/demo/machines")["machines"]
        assert [m["state"] for m in machines if m["machine"] == deployment.machine] == ["cut-over"]
        jobs = deployment.api("/tenants/demo/jobs")["jobs"]
        assert {j["kind"]: j["state"] for j in jobs}["cutover"] == "cutover-complete"
    else:
        served = json.loads((deployment.state / "master-target" / "protected.json").read_text())
        assert deployment.disk not in served["disks"]
    fence = deployment.storage().get_json(
        naming.control_container("demo", deployment.disk), f"demo/{deployment.disk}/fence.json"
    )
    assert fence["tag"]["id"] == manifest["final_tag"]["id"]
    # The master target stopped at the final tag, for good, and let go of the disk.
    cursor = deployment.cursor()
    assert cursor["last_tag"]["id"] == cursor["fenced"]["tag"]["id"] == manifest["final_tag"]["id"]
    assert cursor["last_tag"]["final"] is True
    lease = naming.lease_blob("demo", deployment.disk)
    with deployment.storage().lease(
        naming.control_container("demo", deployment.disk), lease, deployment.disk, 15
    ):
        pass  # free: nothing serves the disk any more


@pytest.mark.usefixtures("cut_over")
def test_cutover_asked_twice_cuts_over_once(deployment):
    vhd = deployment.base / "ferry" / "cutover" / deployment.machine / f"{deployment.disk}.vhd"
    stamp = vhd.stat().st_mtime_ns
    result = deployment.ok("cutover.yml", "-e", "machine=web01")
    assert not any(changes(result).values()), changes(result)
    assert "was cut over at tag" in " ".join(result.stdout.split())
    assert vhd.stat().st_mtime_ns == stamp
    # site.yml keeps the fenced agent down.
    deployment.ok("site.yml", "-l", "web01")
    assert "agent" not in deployment.running()


@pytest.mark.usefixtures("deployed")
def test_teardown_stops_everything(deployment):
    deployment.ok("teardown.yml")
    deployment.stage = None
    assert not deployment.running()
    assert not shutil.which("ferry-supervise")  # nothing was installed outside the base
    assert not list((deployment.base / "ferry" / "systemd").iterdir())

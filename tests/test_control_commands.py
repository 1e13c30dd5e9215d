"""CommandPoller: commands from the real configuration server, through a real Azurite queue.

Commands are issued with the operator's API; the poller reads them with the
component's SAS grant; duplicates are real queue messages (at-least-once
delivery is what Azure queues promise, so the test delivers twice itself).
"""

from __future__ import annotations

import json
import threading

import pytest
from azure.storage.queue import TextBase64DecodePolicy
from support import wait_for
from support.config_server import serve_config
from support.operator import agent_disk

from ferry.control.client import Client
from ferry.control.commands import CommandJournal, CommandPoller
from ferry.control.errors import CommandFailed, ControlUnavailable
from ferry.storage import Storage


@pytest.fixture(scope="module")
def config_server(tmp_path_factory):
    yield from serve_config(tmp_path_factory, tls=False)


class RecordingClient(Client):
    """The real client, remembering the outcomes it reported (the server gets them too)."""

    def __init__(self, credentials, fail_reports: int = 0) -> None:
        super().__init__(credentials)
        self.reports: list[tuple[str, str, object]] = []
        self.fail_reports = fail_reports

    def command_done(self, command_id, state, detail=None):
        if self.fail_reports:
            self.fail_reports -= 1
            raise ControlUnavailable(server=self.server, problem="injected outage")
        super().command_done(command_id, state, detail)
        self.reports.append((command_id, state, detail))


@pytest.fixture
def setup(config_server, tenant, tmp_path):
    """An operator, a registered agent, its client, its SAS storage, and the account's."""
    operator = config_server.tenant(tenant)
    creds = operator.register("agent", "web01", disks=agent_disk(tmp_path))
    client = RecordingClient(creds)
    admin = Storage(config_server.azurite.connection_string)
    return operator, client, client.open_storage(), admin


def peek_raw(admin: Storage, queue: str) -> str:
    """The text of the first message, left in the queue as it is."""
    client = admin.queues.get_queue_client(queue, message_decode_policy=TextBase64DecodePolicy())
    [message] = client.peek_messages(max_messages=1)
    return message.content


def drain(poller: CommandPoller, rounds: int = 20) -> None:
    """Poll until the queue gave nothing twice in a row."""
    empty = 0
    for _ in range(rounds):
        empty = empty + 1 if poller.poll_once() == 0 else 0
        if empty == 2:
            return


def test_a_command_delivered_twice_runs_once(setup, tmp_path):
    operator, client, granted, admin = setup
    queue = client.credentials.command_queue
    runs = []
    handlers = {"pause": lambda args: runs.append(args) or "paused"}
    command = operator.command("web01", "pause")
    original = peek_raw(admin, queue)
    admin.send_raw(queue, original)  # the queue delivers it a second time
    poller = CommandPoller(client, granted, tmp_path / "state", handlers)
    drain(poller)
    assert len(runs) == 1 and runs[0]["machine"] == "web01"
    assert client.reports == [(command, "done", "paused")]
    assert admin.peek_count(queue) == 0  # both copies deleted

    # A restarted component remembers: a third delivery is still not run.
    admin.send_raw(queue, original)
    again = CommandPoller(client, granted, tmp_path / "state", handlers)
    drain(again)
    assert len(runs) == 1
    assert admin.peek_count(queue) == 0


def test_a_failing_command_is_reported_failed_with_its_reason(setup, tmp_path):
    operator, client, granted, _ = setup

    def refuse(_args):
        raise CommandFailed(detail="this machine is not protected yet (no disks)")

    command = operator.command("web01", "resync")
    poller = CommandPoller(client, granted, tmp_path / "state", {"resync": refuse})
    drain(poller)
    assert client.reports == [(command, "failed", "this machine is not protected yet (no disks)")]
    assert poller.journal.get(command)["state"] == "failed"


def test_a_bug_in_a_handler_fails_the_command_and_the_poller_goes_on(setup, tmp_path):
    operator, client, granted, _ = setup
    first = operator.command("web01", "tag", kind="app")
    second = operator.command("web01", "resume")
    handlers = {"tag": lambda args: 1 / 0, "resume": lambda args: "resumed"}
    poller = CommandPoller(client, granted, tmp_path / "state", handlers)
    drain(poller)
    assert client.reports == [
        (first, "failed", "ZeroDivisionError: division by zero"),
        (second, "done", "resumed"),
    ]


def test_an_unsupported_command_is_reported_failed(setup, tmp_path):
    operator, client, granted, _ = setup
    command = operator.command("web01", "drain")
    poller = CommandPoller(client, granted, tmp_path / "state", {})
    drain(poller)
    assert client.reports == [(command, "failed", "drain is not supported by this component")]


def test_an_outcome_the_server_missed_is_reported_later(setup, tmp_path):
    operator, client, granted, _ = setup
    client.fail_reports = 1
    runs = []
    command = operator.command("web01", "pause")
    poller = CommandPoller(client, granted, tmp_path / "state", {"pause": runs.append})
    poller.poll_once()
    assert len(runs) == 1 and client.reports == []
    assert not poller.journal.get(command)["reported"]
    poller.poll_once()
    assert len(runs) == 1
    assert client.reports == [(command, "done", None)]
    assert CommandJournal(tmp_path / "state" / "commands.json").get(command)["reported"]


def test_a_command_interrupted_by_a_crash_is_failed_not_rerun(setup, tmp_path):
    operator, client, granted, admin = setup
    queue = client.credentials.command_queue
    command = operator.command("web01", "resync")
    message = peek_raw(admin, queue)
    journal = CommandJournal(tmp_path / "state" / "commands.json")
    journal.start(command, "resync")  # as a process killed inside the handler leaves it
    runs = []
    poller = CommandPoller(client, granted, tmp_path / "state", {"resync": runs.append})
    drain(poller)
    assert runs == []
    assert client.reports == [
        (command, "failed", "interrupted: the component stopped while running it")
    ]
    assert admin.peek_count(queue) == 0
    assert json.loads(message)["id"] == command


def test_unusable_messages_are_dropped_without_running_anything(setup, tmp_path):
    _, client, granted, admin = setup
    queue = client.credentials.command_queue
    admin.send_raw(queue, "not json at all")
    admin.send(queue, {"type": "pause"})  # no id
    runs = []
    poller = CommandPoller(client, granted, tmp_path / "state", {"pause": runs.append})
    drain(poller)
    assert runs == [] and client.reports == []
    assert admin.peek_count(queue) == 0


def test_the_running_poller_picks_up_commands_and_stops_promptly(setup, tmp_path):
    operator, client, granted, _ = setup
    seen = threading.Event()
    poller = CommandPoller(
        client,
        granted,
        tmp_path / "state",
        {"pause": lambda args: seen.set()},
        poll_min=0.05,
        poll_max=0.5,
    )
    idle = []
    poll_once = poller.poll_once

    def counted() -> int:
        seen_now = poll_once()
        if seen_now == 0:
            idle.append(seen_now)
        return seen_now

    poller.poll_once = counted
    poller.start()
    try:
        # Five idle polls: the pause has doubled from 0.05 s up to poll_max.
        wait_for(lambda: len(idle) >= 5, 30, "five idle polls")
        operator.command("web01", "pause")
        assert seen.wait(30)
    finally:
        poller.stop()
    assert not poller.is_alive()


def test_the_journal_forgets_only_reported_commands(tmp_path):
    journal = CommandJournal(tmp_path / "commands.json", kept=3)
    for i in range(5):
        journal.start(f"cmd-{i}", "pause")
        journal.finish(f"cmd-{i}", "done", None)
        if i != 1:
            journal.reported(f"cmd-{i}")
    kept = CommandJournal(tmp_path / "commands.json")
    assert "cmd-1" in kept.entries  # unreported: kept until the server heard it
    assert len(kept.entries) <= 4


def test_a_poller_without_its_queue_in_the_grant_keeps_trying(setup, tmp_path, caplog):
    _, client, _, admin = setup
    grant = client.storage_grant()
    grant["queues"] = {}
    poller = CommandPoller(client, Storage.from_grant(grant), tmp_path / "state", {})
    assert poller.poll_once() == 0
    assert poller.poll_once() == 0
    assert sum("polling command queue" in r.message for r in caplog.records) == 1

"""SAS tokens grant what each component needs and nothing more (checked against Azurite)."""

from __future__ import annotations

import base64
import json

import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import ContainerClient
from azure.storage.queue import QueueClient

from ferry import naming


def _grants(api, token):
    answer = api.get("/components/self/storage", token)
    assert answer.status_code == 200, answer
    return answer.json()


def _container(grants, name):
    return ContainerClient(grants["blob_endpoint"], name, credential=grants["containers"][name])


def _queue(grants, name, sas=None):
    return QueueClient(grants["queue_endpoint"], name, credential=sas or grants["queues"][name])


def _refused(call):
    with pytest.raises(HttpResponseError) as caught:
        call()
    assert caught.value.status_code in (403, 404), caught.value


def test_process_server_writes_segments_but_cannot_read_or_delete_them(api):
    estate = api.estate()
    api.protect(estate)
    ps, mt = _grants(api, estate.ps), _grants(api, estate.mt)
    blob = naming.segment_blob(estate.tenant, estate.disks[0], 1, 1)
    segments = _container(ps, naming.segments_container(estate.tenant, estate.disks[0]))
    segments.upload_blob(blob, b"segment", overwrite=True)
    _refused(lambda: segments.download_blob(blob).readall())
    _refused(lambda: segments.delete_blob(blob))
    queue = naming.disk_queue(estate.tenant, estate.disks[0])
    _queue(ps, queue).send_message("notice")
    _refused(lambda: list(_queue(ps, queue).receive_messages()))
    # The master target reads and deletes what the process server wrote.
    target_segments = _container(mt, naming.segments_container(estate.tenant, estate.disks[0]))
    assert target_segments.download_blob(blob).readall() == b"segment"
    _refused(lambda: target_segments.upload_blob(blob + ".x", b"forged", overwrite=True))
    messages = list(_queue(mt, queue).receive_messages())
    assert [m.content for m in messages] == ["notice"]
    _queue(mt, queue).delete_message(messages[0])
    _queue(mt, naming.poison_queue(queue)).send_message("poisoned")
    _refused(lambda: list(_queue(mt, naming.poison_queue(queue)).receive_messages()))
    target_segments.delete_blob(blob)


def test_grants_do_not_reach_another_tenant_or_another_component(api):
    ours, theirs = api.estate(), api.estate(machine="db01", disks=1)
    api.protect(ours)
    api.protect(theirs)
    ps = _grants(api, ours.ps)
    their_queue = naming.disk_queue(theirs.tenant, theirs.disks[0])
    assert their_queue not in ps["queues"]
    our_queue_sas = ps["queues"][naming.disk_queue(ours.tenant, ours.disks[0])]
    _refused(lambda: _queue(ps, their_queue, our_queue_sas).send_message("forged"))
    # Segments are per disk too: our master target cannot read theirs, even by name.
    their_mt = _grants(api, theirs.mt)
    their_blob = naming.segment_blob(theirs.tenant, theirs.disks[0], 1, 1)
    their_segments = naming.segments_container(theirs.tenant, theirs.disks[0])
    _container(_grants(api, theirs.ps), their_segments).upload_blob(their_blob, b"theirs")
    assert _container(their_mt, their_segments).download_blob(their_blob).readall() == b"theirs"
    mt = _grants(api, ours.mt)
    assert their_segments not in mt["containers"]
    our_sas = mt["containers"][naming.segments_container(ours.tenant, ours.disks[0])]
    stolen = ContainerClient(mt["blob_endpoint"], their_segments, credential=our_sas)
    _refused(lambda: stolen.download_blob(their_blob).readall())
    agent = _grants(api, ours.agent)
    assert agent["containers"] == {}
    assert list(agent["queues"]) == [naming.command_queue(ours.tenant, "ag-web01")]
    their_commands = naming.command_queue(theirs.tenant, "ag-db01")
    _refused(lambda: list(_queue(agent, their_commands, agent["queues"][
        naming.command_queue(ours.tenant, "ag-web01")]).receive_messages()))  # fmt: skip
    # Its own command queue: it can read and delete, not send.
    own = _queue(agent, naming.command_queue(ours.tenant, "ag-web01"))
    messages = list(own.receive_messages())
    assert [json.loads(base64.b64decode(m.content))["type"] for m in messages] == ["protect"]
    own.delete_message(messages[0])
    _refused(lambda: own.send_message("forged"))


def test_grants_expire_within_the_hour(api):
    estate = api.estate()
    grants = _grants(api, estate.mt)
    assert 3500 <= grants["expires_at"] - api.clock() <= 3600

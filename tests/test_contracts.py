"""Contracts two parts share, checked where both sides meet: one owner, no drifting copies.

The queue notices (ferry/notice.py: the process server writes, the master
target reads), the bearer tokens (ferry/tokens.py: the configuration server
issues and reads, the CLI reads) and the id pattern (ferry/naming.py, copied
into the Ansible roles, which cannot import it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ferry import naming, notice, segment, tokens
from ferry.batch import DATA, Batch
from ferry.naming import ID_RE
from functions.core.redact import redact
from mastertarget import notices
from mastertarget.errors import BadNotice
from processserver import uploader
from processserver.spool import Spooled

ROOT = Path(__file__).resolve().parent.parent
ROLE_YAML = sorted((ROOT / "roles").glob("*/**/*.yml"))

_ID_PATTERN_COPY = re.compile(r"'(\^\[a-z0-9\]\(\?:.*?\$)'")
"""A quoted regex in role YAML that starts like ID_RE: a copy of it."""


def role_id_vars() -> dict[str, str]:
    """Every role variable named ``*_id_re``, by ``<file>:<name>``."""
    found = {}
    for path in ROLE_YAML:
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict):
            for name, value in data.items():
                if name.endswith("_id_re"):
                    found[f"{path.relative_to(ROOT)}:{name}"] = value
    return found


def test_role_id_variables_equal_the_id_pattern():
    found = role_id_vars()
    assert found, "no role defines an *_id_re variable: the check has nothing to compare"
    differ = {where: value for where, value in found.items() if value != ID_RE.pattern}
    assert not differ, f"these differ from ferry.naming.ID_RE ({ID_RE.pattern}): {differ}"


def test_inline_id_patterns_in_roles_equal_the_id_pattern():
    copies = {}
    for path in ROLE_YAML:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for copy in _ID_PATTERN_COPY.findall(line):
                copies[f"{path.relative_to(ROOT)}:{number}"] = copy
    assert copies, "no copy of the id pattern found in roles/: the check has nothing to compare"
    differ = {where: copy for where, copy in copies.items() if copy != ID_RE.pattern}
    assert not differ, f"these differ from ferry.naming.ID_RE ({ID_RE.pattern}): {differ}"


def batch(gen: int = 3, seq: int = 7, tag: dict | None = None) -> Batch:
    return Batch("demo", "web01-disk0", gen, seq, 1 << 20, [(0, 4096, DATA)], b"x" * 4096, tag)


def test_the_segment_notice_the_process_server_writes_is_what_the_master_target_reads():
    spooled = Spooled.pack(batch(tag={"id": "t-1", "reason": "fence"}), None, 1)
    body = uploader.notice(spooled)
    parsed = notices.parse(body, "demo", "web01-disk0")
    blob = naming.segment_blob("demo", "web01-disk0", 3, 7)
    assert parsed == notice.SegmentNotice(3, 7, blob, spooled.checksum, "t-1")
    assert body["blob"] == blob and body["bytes"] == len(spooled.data)
    # The segment the notice names checks out against it, as the master target reads it.
    assert segment.unpack(spooled.data, blob, checksum=parsed.checksum).tag["id"] == "t-1"


@pytest.mark.parametrize(
    ("change", "segment_claimed"),
    [
        ({"blob": "demo/other-disk/00000003/000000000007.seg"}, True),
        ({"checksum": "0" * 31}, True),
        ({"seq": 0}, True),
        ({"gen": True}, True),
        ({"disk": "other-disk"}, False),
        ({"type": "apply"}, False),
    ],
)
def test_a_tampered_segment_notice_is_refused(change, segment_claimed):
    body = {**uploader.notice(Spooled.pack(batch(), None, 1)), **change}
    with pytest.raises(BadNotice) as refused:
        notices.parse(body, "demo", "web01-disk0")
    assert refused.value.segment is segment_claimed


def test_the_resync_notice_round_trips_and_its_block_size_is_bounded():
    body = notice.resync("demo", "web01-disk0", "req-1", 65536)
    assert notices.parse(body, "demo", "web01-disk0") == notice.ResyncNotice("req-1", 65536)
    for block in (notice.RESYNC_MIN_BLOCK - 1, notice.RESYNC_MAX_BLOCK + 512, 1000):
        with pytest.raises(BadNotice, match="block_size"):
            notices.parse({**body, "block_size": block}, "demo", "web01-disk0")


def test_tokens_claim_who_they_were_issued_to():
    assert tokens.claim(tokens.operator_token("demo")) == tokens.Claim("operator", "demo")
    issued = tokens.component_token("demo", "ag-web01")
    assert tokens.claim(issued) == tokens.Claim("component", "demo", "ag-web01")
    for bad in ("op.Demo.secret", "c.demo.ag.web01.secret", "x.demo.secret", "", "op..s"):
        assert tokens.claim(bad) is None, bad


def test_a_logged_token_keeps_who_it_is_and_loses_its_secret():
    issued = tokens.component_token("demo", "ag-web01")
    secret = issued.rsplit(".", 1)[1]
    line = f"rotating to {issued} for demo/ag-web01"
    for scrub in (tokens.redact, redact):
        scrubbed = scrub(line)
        assert secret not in scrubbed and "c.demo.ag-web01.<redacted>" in scrubbed


def test_the_api_documents_ids_with_the_pattern_the_server_enforces():
    """The OpenAPI document's id patterns are ferry.naming's, not copies that may drift."""
    from functions.core import openapi

    ids = re.compile(openapi.ID["pattern"])
    components = re.compile(openapi.COMPONENT_ID["pattern"])
    for good in ("web01", "a", "a-b-c", "x" * 40):
        assert ids.match(good) and ID_RE.match(good), good
    for bad in ("Web01", "-a", "a-", "a--b", "a_b", ""):
        assert not ids.match(bad) and not ID_RE.match(bad), bad
    for kind, prefix in naming.KIND_PREFIX.items():
        assert (
            components.match(f"{prefix}-web01") and naming.component_kind(f"{prefix}-web01") == kind
        )
    for bad in ("xx-web01", "ag-", "ag-Web01", "ag--web01", "web01"):
        assert not components.match(bad), bad


def test_the_cutover_role_finds_the_agent_where_the_mobility_agent_role_puts_it():
    """The agent's state directory and the role's record in it, seen from both roles."""
    agent_defaults = yaml.safe_load((ROOT / "roles/mobility_agent/defaults/main.yml").read_text())
    agent_vars = yaml.safe_load((ROOT / "roles/mobility_agent/vars/main.yml").read_text())
    cutover = yaml.safe_load((ROOT / "roles/cutover/vars/main.yml").read_text())
    state_dir = "{{ ferry_state_dir | default('/var/lib/ferry') }}/agent"
    assert agent_defaults["mobility_agent_state_dir"] == state_dir
    assert cutover["_cutover_state_dir"] + "/agent" == state_dir
    assert cutover["_cutover_agent_state_dir"] == "{{ _cutover_state_dir }}/agent"
    record = agent_vars["_mobility_agent_protected_file"]
    assert record == "{{ mobility_agent_state_dir }}/protected.json"
    assert cutover["_cutover_agent_protected"] == "{{ _cutover_agent_state_dir }}/protected.json"

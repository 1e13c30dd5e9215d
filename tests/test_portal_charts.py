"""The portal's charts: the RPO saw-tooth drawn from recovery points, over a true hour.

The unit tests feed :mod:`portal.charts` points; the last two read a real
configuration server (over HTTPS, on Azurite) through the portal's own pages
(httpx over the ASGI app, as a browser would ask).  Their recovery points are
written into the server's table directly: the API stamps ``reported_at``
with the time of the request, and these must be spread over the past hour.
"""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from support.config_server import ADMIN_KEY, serve_config

from functions.core import context
from portal import charts, defaults
from portal.app import create_app
from portal.settings import Settings


def point(t0: float, reported: float) -> dict:
    return {"t0_wall": t0, "reported_at": reported, "tag_id": f"1-{int(t0)}", "kind": "crash"}


def test_the_rpo_grows_between_recovery_points_and_drops_at_each():
    # Points taken at 100 and 160, each known 5 s later; the window is 0..200.
    corners = charts.rpo_series([point(160, 165), point(100, 105)], start=0, end=200)
    assert corners == [(105, 5), (165, 65), (165, 5), (200, 40)]


def test_a_point_before_the_window_sets_where_the_line_starts():
    corners = charts.rpo_series([point(-50, -45), point(30, 40)], start=0, end=100)
    assert corners == [(0, 50), (40, 90), (40, 10), (100, 70)]


def test_no_recovery_point_draws_nothing_and_says_so():
    chart = charts.rpo_chart([], threshold=60, now=1000.0)
    assert chart.empty and chart.polyline == ""
    assert charts.timeline([], now=1000.0).empty


def test_data_that_starts_late_in_the_window_is_said_to():
    start = 10_000.0
    late = [point(start + 1200, start + 1203), point(start + 1800, start + 1802)]
    assert charts.data_start(late, [], start) == start + 1203
    # The point in force at the start covers the window, whatever comes after.
    assert charts.data_start(late, [point(start - 30, start - 28)], start) is None
    # A first point within a minute of the start is the whole window to a reader.
    assert charts.data_start([point(start + 20, start + 22)], [], start) is None
    chart = charts.rpo_chart(late, 60, now=start + defaults.RPO_WINDOW, since=start + 1203)
    assert chart.since == f"data since {time.strftime('%H:%M', time.localtime(start + 1203))}"
    assert chart.polyline.startswith(f"{chart.since_x},")  # the line starts where it says


def test_an_hour_of_every_disk_fits_one_listing():
    for disks in (1, 2, 8):
        every = charts.slice_seconds(disks)
        assert disks * (defaults.RPO_WINDOW / every + 1) <= defaults.RECOVERY_POINTS


# -- through the portal's pages, against the real server ----------------------------------


@pytest.fixture(scope="module")
def config_server(tmp_path_factory):
    yield from serve_config(tmp_path_factory, tls=True)


def seed(config_server, op, machine: str, times: list[float]) -> None:
    """A registered agent's disk with a recovery point made at each of ``times``."""
    disk = f"{machine}-disk0"
    op.register("agent", machine, disks=[{"id": disk, "device": "/dev/null", "size": 1 << 20}])
    store = context.from_settings(
        {"FERRY_STORAGE": config_server.azurite.connection_string, "FERRY_ADMIN_KEY": ADMIN_KEY}
    ).store

    def made(seq: int, t0: float) -> bool:
        tag = {"id": f"1-{seq}", "kind": "crash", "t0_wall": t0}
        return store.create("recoverypoints", op.tenant, f"{disk}|1-{seq}", {
            "disk": disk, "machine": machine, "tag": tag, "tag_id": f"1-{seq}", "kind": "crash",
            "t0_wall": t0, "gen": 1, "seq": seq, "reported_at": t0 + 2, "master_target": "mt-mt1",
        })  # fmt: skip

    with ThreadPoolExecutor(8) as pool:  # hundreds of rows: in parallel, as many writers would
        assert all(pool.map(made, range(1, len(times) + 1), times))


def machine_page(config_server, op, machine: str) -> str:
    """The machine page as a signed-in operator's browser gets it."""
    app = create_app(Settings(server=config_server.url, ca=config_server.ca))

    async def browse() -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as web:
            form = (await web.get("/signin")).text
            csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
            await web.post("/signin", data={"csrf": csrf, "token": op.token})
            answer = await web.get(f"/t/{op.tenant}/machines/{machine}")
            assert answer.status_code == 200, answer.text[:500]
            return answer.text

    return asyncio.run(browse())


def rpo_line(page: str) -> list[tuple[float, float]]:
    svg = page[page.index('aria-label="RPO over the last hour') :]
    raw = re.search(r'<polyline points="([^"]+)"', svg).group(1)
    return [tuple(map(float, corner.split(","))) for corner in raw.split()]


def test_the_machine_page_charts_the_whole_last_hour(config_server):
    op = config_server.tenant("rc" + str(int(time.time() * 1000))[-8:])
    now = time.time()
    # A point every 6 s from two minutes before the hour began: 620 rows, more than one
    # page of the old listing (500), so only a window asked for covers the whole hour.
    seed(config_server, op, "db01", [now - 3720 + 6 * i for i in range(620)])
    page = machine_page(config_server, op, "db01")
    line = rpo_line(page)
    assert line[0][0] == charts.LEFT, "the RPO line must start at the window's start"
    assert line[-1][0] == charts.WIDTH - charts.RIGHT  # ... and reach now
    assert max(v for _, v in line) < line[0][1] + 200  # a saw-tooth, not one long climb
    assert "data since" not in page
    dots = re.findall(r'<circle cx="([0-9.]+)"', page)
    assert float(min(dots, key=float)) < charts.LEFT + 2  # points from the first minute on


def test_data_kept_for_less_than_the_hour_says_since_when(config_server):
    op = config_server.tenant("rd" + str(int(time.time() * 1000))[-8:])
    now = time.time()
    first = now - 1200  # the server holds only the last 20 minutes
    seed(config_server, op, "db02", [first + 6 * i for i in range(195)])
    page = machine_page(config_server, op, "db02")
    since = f"data since {time.strftime('%H:%M', time.localtime(first + 2))}"
    assert page.count(since) >= 2  # on both charts
    assert f"{since.capitalize()}: the configuration server keeps no earlier" in page
    start_x = rpo_line(page)[0][0]
    assert start_x == pytest.approx(charts._x(first + 2, now - defaults.RPO_WINDOW, 3600), abs=2)

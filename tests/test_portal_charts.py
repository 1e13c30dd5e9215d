"""The portal's RPO chart: the saw-tooth drawn from recovery points."""

from __future__ import annotations

from portal import charts


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

"""Small SVG charts drawn on the server: a machine's recovery points and its RPO over time.

Both are plain markup (no script, no inline style: the CSP allows neither),
escaped by Jinja2 like the rest of the page, and readable without
JavaScript.  The RPO at an instant *t* is *t* minus the source time
(``t0_wall``) of the newest recovery point known at *t* (its
``reported_at``): it grows by one second per second and drops each time a
recovery point arrives, so the chart is a saw-tooth.

The machine page asks the configuration server for the window only
(``since``), thinned to the newest point of each slice of
:func:`slice_seconds` (``every``) so the hour fits one listing, plus each
disk's point in force at the window's start (``earlier``).  When the data
starts later than the window (the server kept fewer points, or the machine
is newer than an hour) both charts say from when (:func:`data_start`)
rather than start mid-window silently.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from portal import defaults

WIDTH, HEIGHT, LEFT, BOTTOM, TOP, RIGHT = 640, 180, 48, 24, 10, 10


@dataclass
class Chart:
    """What a template draws: points already scaled to the SVG box."""

    width: int
    height: int
    polyline: str
    dots: list[dict[str, Any]]
    y_ticks: list[dict[str, Any]]
    x_ticks: list[dict[str, Any]]
    threshold_y: float | None
    empty: bool
    since: str | None = None
    since_x: float | None = None
    since_anchor: str = "start"


def _x(t: float, start: float, span: float) -> float:
    return round(LEFT + (t - start) / span * (WIDTH - LEFT - RIGHT), 1)


def _y(value: float, top: float) -> float:
    return round(HEIGHT - BOTTOM - value / top * (HEIGHT - BOTTOM - TOP), 1)


def _x_ticks(start: float, span: float) -> list[dict[str, Any]]:
    ticks = []
    for minutes_ago in range(int(span // 60), -1, -15):
        t = start + span - minutes_ago * 60
        ticks.append(
            {"x": _x(t, start, span), "label": f"-{minutes_ago} min" if minutes_ago else "now"}
        )
    return ticks


def rpo_series(points: list[dict[str, Any]], start: float, end: float) -> list[tuple[float, float]]:
    """(time, RPO in seconds) corners of the saw-tooth between ``start`` and ``end``."""
    known = sorted((p.get("reported_at") or p["t0_wall"], p["t0_wall"]) for p in points)
    newest_t0: float | None = None
    corners: list[tuple[float, float]] = []
    for at, t0 in known:
        if at <= start:
            newest_t0 = max(t0, newest_t0 or t0)
            continue
        if at > end:
            break
        if newest_t0 is not None:
            if not corners:
                corners.append((start, start - newest_t0))
            corners.append((at, at - newest_t0))
        newest_t0 = max(t0, newest_t0 or t0)
        corners.append((at, max(0.0, at - newest_t0)))
    if newest_t0 is not None:
        if not corners:
            corners.append((start, start - newest_t0))
        corners.append((end, end - newest_t0))
    return corners


def slice_seconds(disks: int) -> int:
    """The ``every`` that fits an hour of ``disks`` disks' points in one listing, in seconds.

    Thinning keeps the newest point of each slice, so between two drawn
    points the chart's RPO may read up to this much above what it was.
    """
    rows = defaults.RECOVERY_POINTS * defaults.RECOVERY_POINTS_FILL
    return max(1, math.ceil(defaults.RPO_WINDOW * max(1, disks) / rows))


def data_start(
    points: list[dict[str, Any]], earlier: list[dict[str, Any]], start: float
) -> float | None:
    """When the charts' data starts, if well after ``start``; None if it covers the window.

    ``earlier`` (the points in force at ``start``) means the RPO is known from
    the window's start; without it the data starts at the first point known.
    """
    if earlier or not points:
        return None
    first = min(p.get("reported_at") or p["t0_wall"] for p in points)
    return first if first > start + defaults.DATA_SINCE_SLACK else None


def _since(chart: Chart, since: float | None, start: float, span: float) -> Chart:
    if since is not None:
        chart.since = f"data since {time.strftime('%H:%M', time.localtime(since))}"
        chart.since_x = _x(since, start, span)
        chart.since_anchor = "start" if chart.since_x < WIDTH * 0.7 else "end"  # stay inside
    return chart


def rpo_chart(
    points: list[dict[str, Any]],
    threshold: float | None,
    now: float | None = None,
    since: float | None = None,
) -> Chart:
    """The RPO over the last RPO_WINDOW seconds, with the machine's threshold.

    ``points`` include the ones in force at the window's start; ``since``
    (:func:`data_start`) marks where the data starts when it is not there.
    """
    end = now or time.time()
    span = defaults.RPO_WINDOW
    start = end - span
    corners = rpo_series(points, start, end)
    peak = max([v for _, v in corners] + [threshold or 0, 10.0])
    top = _nice(peak * 1.1)
    line = " ".join(f"{_x(t, start, span)},{_y(v, top)}" for t, v in corners)
    y_ticks = [{"y": _y(v, top), "label": _seconds(v)} for v in (0, top / 2, top)]
    chart = Chart(WIDTH, HEIGHT, line, [], y_ticks, _x_ticks(start, span),
                  _y(threshold, top) if threshold else None, not corners)  # fmt: skip
    return _since(chart, since, start, span)


def timeline(
    points: list[dict[str, Any]], now: float | None = None, since: float | None = None
) -> Chart:
    """Recovery points of the last RPO_WINDOW seconds as dots on a line, by source time."""
    end = now or time.time()
    span = defaults.RPO_WINDOW
    start = end - span
    dots = []
    for p in points:
        if start <= p["t0_wall"] <= end:
            dots.append({
                "x": _x(p["t0_wall"], start, span), "tag": p.get("tag_id"), "kind": p.get("kind"),
                "final": bool((p.get("tag") or {}).get("final")),
                "at": time.strftime("%H:%M:%S", time.localtime(p["t0_wall"])),
            })  # fmt: skip
    return _since(Chart(WIDTH, 60, "", dots, [], _x_ticks(start, span), None, not dots),
                  since, start, span)  # fmt: skip


def _nice(value: float) -> float:
    for step in (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 86400):
        if value <= step:
            return float(step)
    return float(value)


def _seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.0f} h"
    if value >= 60:
        return f"{value / 60:.0f} min"
    return f"{value:.0f} s"

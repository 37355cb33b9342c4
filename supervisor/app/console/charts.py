"""Charts drawn on the server as SVG: no chart library, no script, nothing a strict
Content-Security-Policy would block (colours come from classes in console.css, never from
style attributes). Pure: figures in, markup out; every text is escaped.

A job's chart tells how its money was saved: credits over time against its limit, the
point the cancel was decided, the cancel call and the confirmed final count. The supervisor
keeps no row per poll, so the curve is rebuilt from what it does keep: the job's start, the
credits every decision and ending recorded, credit warnings, and its latest poll.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from markupsafe import Markup, escape

from supervisor.app.views import JobDetailView
from supervisor.core.states import TERMINAL

WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 150, 16, 34  # room for the axis labels and the markers' names


@dataclass(frozen=True)
class Point:
    at: datetime
    credits: int


@dataclass(frozen=True)
class Story:
    points: tuple[Point, ...]  # credits over time, in time order
    limit: int | None
    decision: Point | None
    cancel_call: datetime | None
    final: Point | None


def job_story(job: JobDetailView) -> Story:
    """What the job's row and events say about its credits over time."""
    points = [Point(job.remote_created_at or job.submitted_at, 0)]
    decision = final = None
    cancel_call = None
    for event in job.events:
        detail = event.detail or {}
        credits = detail.get("credits")
        if event.kind == "warning" and event.reason == "max_credits" and isinstance(detail.get("value"), int | float):
            points.append(Point(event.at, int(detail["value"])))
        if not isinstance(credits, int):
            continue
        points.append(Point(event.at, credits))
        if event.kind == "transition" and event.to_state == "cancelling":
            decision = Point(event.at, credits)
        elif event.kind == "transition" and event.to_state in TERMINAL:
            final = Point(event.at, credits)
    for event in job.events:  # the call: the move to confirming, or the first failed attempt
        if event.kind == "transition" and event.to_state == "confirming":
            cancel_call = event.at
            break
        if event.kind == "cancel_error" and cancel_call is None:
            cancel_call = event.at
    if job.last_polled_at is not None and job.state not in TERMINAL:
        points.append(Point(job.last_polled_at, job.credits_used))
    points.sort(key=lambda p: p.at)
    return Story(tuple(points), job.limits.max_credits, decision, cancel_call, final)


def _elapsed(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def credits_chart(story: Story, forecast: Point | None = None) -> Markup:
    """The job's credits over time, as an inline <svg>; `forecast`: where a running job is
    predicted to end (its final credits, and when), drawn as a dashed line to it."""
    start = story.points[0].at
    ends = [p.at for p in story.points] + ([story.cancel_call] if story.cancel_call else [])
    end_at = max([*ends, forecast.at] if forecast else ends)
    span = max((end_at - start).total_seconds(), 1.0)
    top = max([p.credits for p in story.points] + [story.limit or 0, 1, forecast.credits if forecast else 0])
    y_max = top * 1.15
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(at: datetime) -> float:
        return LEFT + (at - start).total_seconds() / span * plot_w

    def y(credits: float) -> float:
        return TOP + plot_h - credits / y_max * plot_h

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="chart-title">',
        '<title id="chart-title">Credits over time</title>',
    ]
    for fraction in (0, 0.25, 0.5, 0.75, 1):  # the grid and the credit axis
        value = y_max * fraction
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}"/>')
        parts.append(f'<text class="axis" x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.0f}</text>')
    for fraction in (0, 0.5, 1):  # the time axis, as time since the job started
        at_x = LEFT + fraction * plot_w
        label = _elapsed(span * fraction)
        parts.append(f'<text class="axis" x="{at_x:.1f}" y="{HEIGHT - 12}" text-anchor="middle">{label}</text>')
    line = " ".join(f"{x(p.at):.1f},{y(p.credits):.1f}" for p in story.points)
    parts.append(f'<polyline class="credits" points="{line}"/>')
    if forecast is not None:
        last = story.points[-1]
        parts.append(
            f'<g class="forecast"><line x1="{x(last.at):.1f}" y1="{y(last.credits):.1f}" x2="{x(forecast.at):.1f}" '
            f'y2="{y(forecast.credits):.1f}"/><text x="{LEFT + plot_w + 6}" y="{y(forecast.credits) + 4:.1f}">'
            f"forecast {forecast.credits}</text></g>"
        )
    if story.limit is not None:
        parts.append(
            f'<g class="limit"><line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(story.limit):.1f}" '
            f'y2="{y(story.limit):.1f}"/><text x="{LEFT + 6}" y="{y(story.limit) - 6:.1f}">'
            f"limit {story.limit}</text></g>"
        )
    if story.cancel_call is not None:
        cx = x(story.cancel_call)
        parts.append(
            f'<g class="cancel-call"><line x1="{cx:.1f}" x2="{cx:.1f}" y1="{TOP}" y2="{TOP + plot_h}"/>'
            f'<text x="{cx + 4:.1f}" y="{TOP + 12}">cancel sent</text></g>'
        )
    for name, point, label in (
        ("decision", story.decision, "decided at"),
        ("final", story.final, "final"),
    ):
        if point is not None:
            px, py = x(point.at), y(point.credits)
            # The final count in the right margin; the decision below and left of its point,
            # so the two never overlap when the cancel lands at once.
            if name == "final":
                where = f'x="{LEFT + plot_w + 6}" y="{py + 4:.1f}"'
            else:
                where = f'x="{px - 8:.1f}" y="{py + 18:.1f}" text-anchor="end"'
            parts.append(
                f'<g class="{name}"><circle cx="{px:.1f}" cy="{py:.1f}" r="5"/>'
                f"<text {where}>{escape(label)} {point.credits}</text></g>"
            )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - built from numbers and escaped text only


def budget_bar(spent: int, reserved: int, credits: int, warn_at: Sequence[float]) -> Markup:
    """A budget's spend (and reservations) against its credits, its warning thresholds marked."""
    width, height = 400, 18

    def w(value: float) -> float:
        return max(0.0, min(value / credits, 1.0)) * width

    parts = [
        (
            f'<svg class="budget-bar" viewBox="0 0 {width} {height}" preserveAspectRatio="none" role="img" '
            f'aria-label="{spent} of {credits} credits spent">'
        ),
        f'<rect class="track" x="0" y="0" width="{width}" height="{height}"/>',
        f'<rect class="spent" x="0" y="0" width="{w(spent):.1f}" height="{height}"/>',
        (
            f'<rect class="reserved" x="{w(spent):.1f}" y="0" width="{w(spent + reserved) - w(spent):.1f}" '
            f'height="{height}"/>'
        ),
    ]
    for threshold in warn_at:
        tx = max(0.0, min(threshold, 1.0)) * width
        parts.append(
            f'<line class="threshold" x1="{tx:.1f}" x2="{tx:.1f}" y1="0" y2="{height}">'
            f"<title>warning at {threshold:.0%}</title></line>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - built from numbers only


# -- a budget's burn chart ---------------------------------------------------------------------


@dataclass(frozen=True)
class Spend:
    """A job of a budget's period, as its spend over time is rebuilt: its credits spread
    evenly from its start to its last progress (the supervisor keeps no row per poll)."""

    start: datetime
    end: datetime | None  # last progress (None: nothing spent yet)
    credits: int


def spent_curve(jobs: Sequence[Spend], start: datetime, now: datetime, samples: int = 48) -> list[Point]:
    """The period's cumulative spend from its start to now, at `samples` + 1 moments."""
    span = max((now - start).total_seconds(), 1.0)
    points = []
    for i in range(samples + 1):
        at = start + (now - start) * (i / samples) if span > 1.0 else now
        total = 0.0
        for job in jobs:
            if job.end is None or job.credits <= 0 or at <= job.start:
                continue
            length = (job.end - job.start).total_seconds()
            total += (
                job.credits if length <= 0 or at >= job.end else job.credits * (at - job.start) / (job.end - job.start)
            )
        points.append(Point(at, round(total)))
    return points


@dataclass(frozen=True)
class Burn:
    """What a budget's burn chart shows (budgets and figures from BudgetView)."""

    name: str
    start: datetime
    end: datetime  # the period's end (a total budget: the forecast's own horizon)
    now: datetime
    spent: tuple[Point, ...]
    credits: int
    forecast: float
    low: float
    high: float
    exhausts_at: datetime | None
    thresholds: tuple[tuple[str, float], ...]  # (label, credits): the warning thresholds


def burn_chart(burn: Burn, *, width: int = WIDTH, height: int = HEIGHT) -> Markup:
    """Spent over the period so far, the forecast line and band from now to the period's end,
    the budget's credits and its warning thresholds, and where it is predicted to run out."""
    start, end = burn.start, max(burn.end, burn.now)
    span = max((end - start).total_seconds(), 1.0)
    top = max([p.credits for p in burn.spent] + [burn.credits, burn.high, 1])
    y_max = top * 1.1
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM
    title_id = f"burn-{escape(burn.name)}"

    def x(at: datetime) -> float:
        return LEFT + max(0.0, min((at - start).total_seconds() / span, 1.0)) * plot_w

    def y(credits: float) -> float:
        return TOP + plot_h - credits / y_max * plot_h

    parts = [
        f'<svg class="chart burn" viewBox="0 0 {width} {height}" role="img" aria-labelledby="{title_id}">',
        f'<title id="{title_id}">Budget {escape(burn.name)}: spend and forecast over the period</title>',
    ]
    for fraction in (0, 0.25, 0.5, 0.75, 1):
        value = y_max * fraction
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}"/>')
        parts.append(f'<text class="axis" x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.0f}</text>')
    for fraction in (0, 0.5, 1):
        at = start + (end - start) * fraction
        parts.append(
            f'<text class="axis" x="{LEFT + fraction * plot_w:.1f}" y="{height - 12}" text-anchor="middle">'
            f"{at:%m-%d %H:%M}</text>"
        )
    last = burn.spent[-1] if burn.spent else Point(burn.now, 0)
    band = f"{x(last.at):.1f},{y(last.credits):.1f} {x(end):.1f},{y(burn.high):.1f} {x(end):.1f},{y(burn.low):.1f}"
    parts.append(
        f'<polygon class="band" points="{band}"><title>forecast band {burn.low:.0f}-{burn.high:.0f}</title></polygon>'
    )
    line = " ".join(f"{x(p.at):.1f},{y(p.credits):.1f}" for p in burn.spent)
    parts.append(f'<polyline class="credits" points="{line}"/>')
    parts.append(
        f'<g class="forecast"><line x1="{x(last.at):.1f}" y1="{y(last.credits):.1f}" x2="{x(end):.1f}" '
        f'y2="{y(burn.forecast):.1f}"/><text x="{LEFT + plot_w + 6}" y="{y(burn.forecast) + 4:.1f}">'
        f"forecast {burn.forecast:.0f}</text></g>"
    )
    parts.append(
        f'<g class="limit"><line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(burn.credits):.1f}" '
        f'y2="{y(burn.credits):.1f}"/><text x="{LEFT + 6}" y="{y(burn.credits) - 6:.1f}">'
        f"credits {burn.credits}</text></g>"
    )
    for label, credits in burn.thresholds:
        parts.append(
            f'<g class="warn-at"><line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(credits):.1f}" '
            f'y2="{y(credits):.1f}"/><text x="{LEFT + plot_w + 6}" y="{y(credits) + 4:.1f}">'
            f"{escape(label)}</text></g>"
        )
    if burn.exhausts_at is not None and burn.exhausts_at <= end:
        ex = x(burn.exhausts_at)
        parts.append(
            f'<g class="exhausts"><line x1="{ex:.1f}" x2="{ex:.1f}" y1="{TOP}" y2="{TOP + plot_h}"/>'
            f'<text x="{ex - 4:.1f}" y="{TOP + 12}" text-anchor="end">runs out {burn.exhausts_at:%H:%M}</text></g>'
        )
    nx = x(burn.now)
    parts.append(f'<line class="now" x1="{nx:.1f}" x2="{nx:.1f}" y1="{TOP}" y2="{TOP + plot_h}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - built from numbers and escaped text only

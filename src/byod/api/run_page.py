"""A fleet run's own dashboard page (``/dashboard/runs/{id}``), and the fleet's shape over
its last runs: server-rendered HTML and inline SVG, no script."""

from __future__ import annotations

from datetime import datetime
from html import escape
from urllib.parse import quote

from byod.api.pages import page
from byod.commands import RunTimeline
from byod.controlplane import RunRecord

__all__ = ["render_run", "versions_over_runs"]

_PALETTE = ("#e0872b", "#8e5bd6", "#2a9d8f", "#c0392b", "#7f8c8d", "#2f6fdf")


def render_run(timeline: RunTimeline, now: datetime) -> str:
    """The run's page: options and who started it, progress (users done over time, rate,
    ETA), halts, failures linked to each user's history, and the per-migration steps.
    Reloads itself while the run is under way."""
    run = timeline.details.run
    counts = run.counts
    running = run.shown_state == "running"
    elapsed = max(0.001, ((run.ended_at or now) - run.started_at).total_seconds())
    done = counts.done
    rate = done / elapsed
    remaining = run.remaining
    eta = "—"
    if running and remaining is not None and rate > 0:
        eta = f"{remaining / rate:.0f} s"
    elif not running:
        eta = "ended"
    halt = (
        f"<p class='bad' id='halt'>halted: {escape(run.halt_reason)}</p>" if run.halt_reason else ""
    )
    planned = "?" if run.planned is None else str(run.planned)
    summary = (
        f"<span class='card'>state: <b id='state'>{escape(run.shown_state)}</b></span>"
        f"<span class='card'>done: <b id='done'>{done}</b>/{planned}</span>"
        f"<span class='card'>succeeded: <b id='succeeded'>{counts.succeeded}</b></span>"
        f"<span class='card bad'>failed: <b id='failed'>{counts.failed}</b></span>"
        f"<span class='card'>rate: <b id='rate'>{rate:.1f}</b> users/s</span>"
        f"<span class='card'>ETA: <b id='eta'>{eta}</b></span>"
    )
    body = (
        "<p><a href='/dashboard'>&larr; fleet</a></p>"
        f"<h1>Run {escape(run.id)}</h1>"
        f"<p>{escape(run.kind)}, started by <b id='started-by'>{escape(run.started_by)}</b> at "
        f"{run.started_at:%Y-%m-%d %H:%M:%S} UTC"
        f"{'' if run.ended_at is None else f', ended {run.ended_at:%H:%M:%S} UTC'}</p>"
        f"{halt}<div id='summary'>{summary}</div>"
        f"<h2>Users done over time</h2>{_progress_chart(timeline, run, now)}"
        f"<h2>Failures</h2>{_failures(timeline)}"
        f"<h2>Steps by migration</h2>{_steps(timeline)}"
        f"<h2>Options</h2>{_options(run)}"
    )
    return page(f"byod: run {run.id}", body, refresh=running)


def _progress_chart(timeline: RunTimeline, run: RunRecord, now: datetime) -> str:
    """Users finished (cumulative) against seconds since the run started."""
    end = (run.ended_at or now) - run.started_at
    span = max(1.0, end.total_seconds())
    finished = [(at - run.started_at).total_seconds() for at in timeline.finished_at]
    total = max([run.planned or 0, len(finished), 1])
    width, height, left, bottom = 600, 180, 40, 24
    points, level = [f"{left},{height}"], float(height)
    for count, seconds in enumerate(finished, start=1):  # a step up at each user done
        x = left + (width - left) * min(1.0, max(0.0, seconds) / span)
        points.append(f"{x:.1f},{level:.1f}")
        level = height - height * count / total
        points.append(f"{x:.1f},{level:.1f}")
    points.append(f"{width},{level:.1f}")
    return (
        f'<svg id="progress-chart" viewBox="0 0 {width + 10} {height + bottom + 10}" '
        f'width="{width + 10}" height="{height + bottom + 10}" role="img" '
        f'aria-label="users done over time" data-users="{len(finished)}">'
        f'<line x1="{left}" y1="{height}" x2="{width}" y2="{height}" stroke="#999"></line>'
        f'<line x1="{left}" y1="0" x2="{left}" y2="{height}" stroke="#999"></line>'
        f'<polyline class="done" fill="none" stroke="#2f6fdf" stroke-width="2" '
        f'points="{" ".join(points)}"></polyline>'
        f'<text x="{left - 6}" y="12" text-anchor="end">{total}</text>'
        f'<text x="{left - 6}" y="{height}" text-anchor="end">0</text>'
        f'<text x="{left}" y="{height + 18}">0 s</text>'
        f'<text x="{width}" y="{height + 18}" text-anchor="end">{span:.0f} s</text></svg>'
    )


def _failures(timeline: RunTimeline) -> str:
    rows = "".join(
        f"<tr class='failure'><td><a href='/dashboard/users/{user_id}'>{user_id} "
        f"({escape(clerk)})</a></td><td>{escape(migration)}</td>"
        f"<td>{escape(error or '')}</td></tr>"
        for user_id, clerk, migration, error in timeline.details.failures
    )
    if not rows:
        return "<p id='failures'>none</p>"
    return (
        f"<table id='failures'><tr><th>user</th><th>migration</th><th>error</th></tr>{rows}</table>"
    )


def _steps(timeline: RunTimeline) -> str:
    statuses = sorted({step.status for step in timeline.steps})
    by_step: dict[tuple[str, str], dict[str, int]] = {}
    for step in timeline.steps:
        by_step.setdefault((step.migration_id, step.direction), {})[step.status] = step.count
    head = "".join(f"<th>{escape(status)}</th>" for status in statuses)
    rows = "".join(
        f"<tr class='migration' data-migration='{escape(migration)}'><td>{escape(migration)}"
        f"</td><td>{escape(direction)}</td>"
        + "".join(f"<td>{counts.get(status, 0)}</td>" for status in statuses)
        + "</tr>"
        for (migration, direction), counts in sorted(by_step.items())
    )
    return (
        f"<table id='steps'><tr><th>migration</th><th>dir</th>{head}</tr>{rows}</table>"
        if rows
        else "<p id='steps'>no step recorded yet</p>"
    )


def _options(run: RunRecord) -> str:
    rows = "".join(
        f"<tr><th>{escape(name)}</th><td>{escape(str(value))}</td></tr>"
        for name, value in sorted(run.spec.flat().items())
        if value not in (None, [], ())
    )
    return f"<table id='options'>{rows}</table>"


def versions_over_runs(runs: list[RunRecord], versions: list[dict[int, int]], head: int) -> str:
    """Users per schema version at the end of each of the last runs, oldest first, as
    stacked bars (the rollout's shape); each bar links to its run's page."""
    if not runs:
        return "<p id='versions-over-time'>no runs yet</p>"
    shown = sorted({v for counts in versions for v in counts} | {head})
    colours = {
        v: "#2f6fdf" if v == head else _PALETTE[i % len(_PALETTE)] for i, v in enumerate(shown)
    }
    top = max([sum(counts.values()) for counts in versions] + [1])
    bar, gap, height = 36, 14, 160
    width = 30 + len(runs) * (bar + gap)
    parts = [
        f'<svg id="versions-over-time" viewBox="0 0 {width} {height + 60}" width="{width}" '
        f'height="{height + 60}" role="img" aria-label="users per version after each run">'
    ]
    for index, (run, counts) in enumerate(zip(runs, versions, strict=True)):
        x = 30 + index * (bar + gap)
        y = float(height)
        parts.append(f'<a href="/dashboard/runs/{quote(run.id, safe="")}">')
        for version in shown:
            n = counts.get(version, 0)
            if not n:
                continue
            h = height * n / top
            y -= h
            parts.append(
                f'<rect class="segment" data-run="{escape(run.id)}" data-version="{version}" '
                f'data-users="{n}" x="{x}" y="{y:.1f}" width="{bar}" height="{h:.1f}" '
                f'fill="{colours[version]}"><title>v{version}: {n}</title></rect>'
            )
        parts.append(
            f'<text x="{x + bar / 2}" y="{height + 16}" text-anchor="middle">{index + 1}</text></a>'
        )
    for index, version in enumerate(shown):
        x = 30 + index * 70
        parts.append(
            f'<rect x="{x}" y="{height + 30}" width="10" height="10" fill="{colours[version]}">'
            f'</rect><text x="{x + 14}" y="{height + 39}">v{version}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)

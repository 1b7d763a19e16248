"""The benchmark charts of the docs, as SVG, from the figures the benches printed.

``bench/figures.json`` holds each chart's figures with the command that measured them;
this writes ``docs/benchmarks/<name>.svg`` for each (plain SVG: no library, nothing
fetched). The docs' tests check the committed charts are what this writes.

    .venv/bin/python bench/charts.py
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "bench" / "figures.json"
OUT = ROOT / "docs" / "benchmarks"

WIDTH, LABEL, BAR, GAP, TOP = 640, 210, 26, 12, 40


def chart(spec: dict[str, object]) -> str:
    """One horizontal bar chart; a target, when given, a dashed line."""
    bars = [(str(label), float(value)) for label, value in spec["bars"]]  # type: ignore[attr-defined]
    target = spec.get("target")
    top_value = max([v for _, v in bars] + ([float(target[1])] if target else []))  # type: ignore[index]
    scale = (WIDTH - LABEL - 90) / top_value
    height = TOP + len(bars) * (BAR + GAP) + 30
    unit = str(spec["unit"])
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="13">',
        f'<text x="4" y="20" font-weight="bold">{escape(str(spec["title"]))}</text>',
    ]
    for n, (label, value) in enumerate(bars):
        y = TOP + n * (BAR + GAP)
        fill = "#3f51b5" if "byod" in label or "users" in label else "#9e9e9e"
        digits = 2 if value < 10 else 1 if value < 100 else 0
        shown = f"{value:,.{digits}f}"
        baseline = f"{y + BAR * 0.68:.0f}"
        out += [
            f'<text x="{LABEL - 8}" y="{baseline}" text-anchor="end">{escape(label)}</text>',
            f'<rect x="{LABEL}" y="{y}" width="{value * scale:.1f}" height="{BAR}" fill="{fill}"/>',
            f'<text x="{LABEL + value * scale + 6:.1f}" y="{baseline}">'
            f"{shown} {escape(unit)}</text>",
        ]
    if target:
        x = LABEL + float(target[1]) * scale  # type: ignore[index]
        bottom = TOP + len(bars) * (BAR + GAP)
        out += [
            f'<line x1="{x:.1f}" y1="{TOP - 6}" x2="{x:.1f}" y2="{bottom}" stroke="#e53935" '
            'stroke-dasharray="5,4" stroke-width="2"/>',
            f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle" fill="#e53935">'
            f"{escape(str(target[0]))}</text>",  # type: ignore[index]
        ]
    out.append("</svg>")
    return "\n".join(out) + "\n"


def charts() -> dict[str, str]:
    """Each chart's file name and its SVG."""
    figures = json.loads(FIGURES.read_text())
    return {f"{spec['name']}.svg": chart(spec) for spec in figures["charts"]}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, svg in charts().items():
        (OUT / name).write_text(svg)
        print(OUT / name)


if __name__ == "__main__":
    main()

"""The dashboard's page frame: one inline stylesheet (allowed by its hash in the CSP, see
:mod:`byod.api.guard`), no script; readable on a phone (390 px wide: tables scroll in
their own box, charts shrink, the page never scrolls sideways)."""

from __future__ import annotations

from html import escape

__all__ = ["STYLE", "page"]

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2rem;color:#1d2330;background:#f7f8fa}
h1{font-size:1.4rem;overflow-wrap:anywhere}h2{font-size:1.1rem;margin-top:2rem}
table{border-collapse:collapse;background:#fff;display:block;max-width:100%;overflow-x:auto}
td,th{border:1px solid #d5d9e0;padding:4px 8px;overflow-wrap:break-word}
th{background:#eef1f5;text-align:left}.bad{color:#b3261e}.ok{color:#1e6b35}
.card{display:inline-block;background:#fff;border:1px solid #d5d9e0;padding:8px 14px;
margin:0 8px 8px 0}
form.inline{display:inline}svg{max-width:100%;height:auto}input{max-width:100%}
.legend span{display:inline-block;margin-right:12px}.swatch{display:inline-block;width:10px;
height:10px;margin-right:4px}
@media (max-width:600px){body{margin:.75rem}}
"""


def page(title: str, body: str, *, refresh: bool = False) -> str:
    """A whole dashboard page; ``refresh``: reloads itself every 2 s (a run under way)."""
    meta = '<meta http-equiv="refresh" content="2">' if refresh else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{meta}<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )

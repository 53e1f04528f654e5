"""The report as one self-contained HTML page: images inline (base64 PNG), styles inline, no script, no
network, so it opens from disk and can be mailed as one file."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Image:
    name: str  # file stem for --png, and the element id
    png: bytes
    alt: str


@dataclass(frozen=True)
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    text_columns: tuple[int, ...] = ()  # columns shown as wrapped text blocks (row contents)


@dataclass
class Section:
    id: str
    title: str
    intro: str = ""
    images: list[Image] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #212529; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #dee2e6; padding-bottom: .2em; }
nav a { margin-right: 1em; } img { max-width: 100%; display: block; margin: .5em 0; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: .85em; width: 100%; }
th, td { border: 1px solid #dee2e6; padding: .25em .5em; vertical-align: top; text-align: left; }
th { background: #f1f3f5; } caption { text-align: left; font-weight: 600; padding: .3em 0; }
td.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: .95em; max-width: 40em; }
.summary td:first-child { font-weight: 600; width: 14em; } p.note { color: #495057; }
"""


def _table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t.columns)
    body = "".join(
        "<tr>" + "".join(f'<td class="text">{html.escape(v)}</td>' if i in t.text_columns
                         else f"<td>{html.escape(v)}</td>" for i, v in enumerate(row)) + "</tr>"
        for row in t.rows)
    caption = f"<caption>{html.escape(t.caption)}</caption>" if t.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(img: Image) -> str:
    data = base64.b64encode(img.png).decode("ascii")
    return f'<img id="fig-{html.escape(img.name)}" alt="{html.escape(img.alt)}" src="data:image/png;base64,{data}">'


def render(title: str, summary: list[tuple[str, str]], sections: list[Section]) -> str:
    nav = "".join(f'<a href="#{html.escape(s.id)}">{html.escape(s.title)}</a>' for s in sections)
    summary_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in summary)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>", f"<nav>{nav}</nav>",
        f'<table class="summary"><tbody>{summary_rows}</tbody></table>',
    ]
    for s in sections:
        parts.append(f'<section id="{html.escape(s.id)}"><h2>{html.escape(s.title)}</h2>')
        if s.intro:
            parts.append(f'<p class="note">{html.escape(s.intro)}</p>')
        parts.extend(_image(img) for img in s.images)
        parts.extend(_table(t) for t in s.tables)
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"

"""``dlmprobe report``: one self-contained HTML page from a folder of saved analyses.

Every analysis saved with :meth:`AnalysisResult.save` is a sub-folder (``result.json``,
``table.csv``, ``figure.png``); the page embeds the figures (base64 PNG), the computed summaries and
the head of each table, and links the full CSVs next to it. The page is written atomically. Nothing in the page is typed by hand:
it is all read from the saved results.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from dlmprobe import __version__
from dlmprobe.analyses.result import load_result
from dlmprobe.files import atomic_write_text

# The order the page tells the story in; other analyses follow alphabetically.
ORDER = ("decodability", "seeds", "lead", "compare", "compare-pathstar", "order", "order-arith", "faithfulness", "paraphrase", "causal", "trajectory")

_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif; max-width: 1200px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #666; font-size: 0.9em; } img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; } th { background: #f5f5f5; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; } code { background: #f3f3f3; padding: 0 3px; }
details { margin: 0.5em 0; } nav a { margin-right: 1em; }
"""


def _markdown(text: str) -> str:
    """The little markdown summaries use: ``` blocks, `code`, **bold**, paragraphs."""
    parts = re.split(r"```\n?(.*?)```", text, flags=re.DOTALL)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<pre>{html.escape(part)}</pre>")
            continue
        escaped = html.escape(part)
        escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
        escaped = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", escaped)
        for paragraph in (p.strip() for p in escaped.split("\n\n")):
            lines = paragraph.splitlines()
            if lines and all(line.startswith("- ") for line in lines):
                out.append("<ul>" + "".join(f"<li>{line[2:]}</li>" for line in lines) + "</ul>")
            elif paragraph:
                out.append(f"<p>{paragraph}</p>")
    return "\n".join(out)


def _table_html(table: pd.DataFrame, rows: int = 12) -> str:
    shown = table.head(rows).copy()
    for column in shown.select_dtypes("float").columns:
        shown[column] = shown[column].map(lambda v: f"{v:.3g}")
    more = f"<p class='meta'>first {rows} of {len(table)} rows</p>" if len(table) > rows else ""
    return shown.to_html(index=False, border=0, escape=True) + more


def analyses_in(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` holding a saved analysis, in the report's order."""
    # Hidden folders are saves still being written (or left by a killed one), not analyses.
    found = {p.parent.name: p.parent for p in folder.glob("*/result.json") if not p.parent.name.startswith(".")}
    rank = {name: i for i, name in enumerate(ORDER)}
    return [found[name] for name in sorted(found, key=lambda n: (rank.get(n, len(ORDER)), n))]


def write_report(folder: str | Path, out: str | Path | None = None, title: str = "dlmprobe report",
                 intro: str = "") -> Path:
    """Write ``out`` (default ``folder/report.html``) from every analysis saved under ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"expected a folder of saved analyses, got {folder} (not a folder)")
    found = analyses_in(folder)
    if not found:
        raise FileNotFoundError(f"{folder} holds no saved analysis (no */result.json): run dlmprobe analyze or demo first")
    out = Path(out) if out is not None else folder / "report.html"
    sections, nav = [], []
    for path in found:
        result = load_result(path)
        anchor = html.escape(path.name, quote=True)
        nav.append(f"<a href='#{anchor}'>{anchor}</a>")
        figure = path / "figure.png"
        image = (f"<img alt='{html.escape(result.title)}' src='data:image/png;base64,"
                 f"{base64.b64encode(figure.read_bytes()).decode()}'>") if figure.is_file() else ""
        csv_links = " · ".join(
            f"<a href='{html.escape(os.path.relpath((path / name).resolve(), out.parent.resolve()))}'>{name}</a>"
            for name in ["table.csv"] + [f"{t}.csv" for t in result.tables]
        )
        extra = "".join(
            f"<details><summary>table <code>{html.escape(name)}</code> ({len(t)} rows)</summary>{_table_html(t)}</details>"
            for name, t in result.tables.items()
        )
        settings = html.escape(json.dumps(result.meta, indent=1, default=str))
        sections.append(
            f"<section id='{anchor}'><h2>{html.escape(result.title)}</h2>{_markdown(result.summary)}{image}"
            f"<details><summary>table ({len(result.table)} rows) — full CSV: {csv_links}</summary>"
            f"{_table_html(result.table)}</details>{extra}"
            f"<details><summary>what was run</summary><pre>{settings}</pre></details></section>"
        )
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p class='meta'>dlmprobe {__version__} · {stamp} · {len(found)} analyses from {html.escape(str(folder))}; "
        f"every number on this page was computed by the run.</p>{_markdown(intro)}<nav>{''.join(nav)}</nav>"
        + "".join(sections) + "</body></html>\n"
    )
    return atomic_write_text(out, page)

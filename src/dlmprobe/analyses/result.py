"""What every analysis returns: a tidy table, a figure, and a few sentences computed from the table.

An :class:`AnalysisResult` saves itself into a folder (``table.csv``, extra tables, ``figure.png``,
``result.json``) from which ``dlmprobe report`` builds the HTML page; :func:`load_result` reads it back.
Figures are plain :class:`matplotlib.figure.Figure` objects (no pyplot state), so analyses run the
same in scripts, the CLI and notebooks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure


@dataclass
class AnalysisResult:
    """The output of one analysis.

    Args:
        name: short slug, also the folder name when saved (``"decodability"``).
        title: a heading for the report.
        table: the tidy table behind the figure, one row per measured quantity.
        figure: the figure (``None`` only when loaded without its image).
        summary: the finding in a few sentences, every number in it computed from ``table``.
        tables: further tables by name (e.g. per-example rows behind a summary table).
        meta: what was run: inputs, settings, sizes (JSON-serialisable).
    """

    name: str
    title: str
    table: pd.DataFrame
    figure: Figure | None
    summary: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/<name>/``: table.csv, <table>.csv for each extra table, figure.png, result.json."""
        out = Path(folder) / self.name
        out.mkdir(parents=True, exist_ok=True)
        self.table.to_csv(out / "table.csv", index=False)
        for key, table in self.tables.items():
            table.to_csv(out / f"{key}.csv", index=False)
        if self.figure is not None:
            self.figure.savefig(out / "figure.png", dpi=110, bbox_inches="tight")
        record = {"name": self.name, "title": self.title, "summary": self.summary,
                  "tables": sorted(self.tables), "meta": self.meta}
        (out / "result.json").write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
        return out

    def _repr_markdown_(self) -> str:  # notebooks show the finding under the cell
        return f"**{self.title}**\n\n{self.summary}"


def load_result(folder: str | Path) -> AnalysisResult:
    """Read a saved result back (the figure stays on disk as ``figure.png``)."""
    folder = Path(folder)
    path = folder / "result.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a saved analysis: expected {path}")
    record = json.loads(path.read_text())
    tables = {key: pd.read_csv(folder / f"{key}.csv") for key in record.get("tables", [])}
    return AnalysisResult(record["name"], record["title"], pd.read_csv(folder / "table.csv"), None,
                          record["summary"], tables, record.get("meta", {}))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)

"""What every analysis returns: a tidy table, a figure, and a few sentences computed from the table.

An :class:`AnalysisResult` saves itself into a folder (``table.csv``, extra tables, ``figure.png``,
``result.json``) from which ``dlmprobe report`` builds the HTML page; :func:`load_result` reads it back.
Figures are plain :class:`matplotlib.figure.Figure` objects (no pyplot state), so analyses run the
same in scripts, the CLI and notebooks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.files import atomic_folder, load_json_object, one_line

RESULT_SCHEMA = {"name": str, "title": str, "summary": str}
# Extra tables are files beside result.json: a plain name, never a path.
_TABLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


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
        """Write ``folder/<name>/``: table.csv, <table>.csv for each extra table, figure.png, result.json.

        The folder is built beside its place and renamed into it whole (replacing an earlier save),
        so a killed or failed save leaves the earlier folder or nothing.
        """
        for key in self.tables:
            if not _TABLE_NAME.fullmatch(key) or key == "table":
                raise DlmprobeInputError(f"table names should be plain file names other than 'table', got {key!r}")
        out = Path(folder) / self.name
        with atomic_folder(out) as tmp:
            self.table.to_csv(tmp / "table.csv", index=False)
            for key, table in self.tables.items():
                table.to_csv(tmp / f"{key}.csv", index=False)
            if self.figure is not None:
                self.figure.savefig(tmp / "figure.png", dpi=110, bbox_inches="tight")
            record = {"name": self.name, "title": self.title, "summary": self.summary,
                      "tables": sorted(self.tables), "meta": self.meta}
            (tmp / "result.json").write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
        return out

    def _repr_markdown_(self) -> str:  # notebooks show the finding under the cell
        return f"**{self.title}**\n\n{self.summary}"


def load_result(folder: str | Path) -> AnalysisResult:
    """Read a saved result back (the figure stays on disk as ``figure.png``).

    A damaged or edited ``result.json`` or table is one DlmprobeInputError line naming the file.
    """
    folder = Path(folder)
    path = folder / "result.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a saved analysis: expected {path}")
    record = load_json_object(path, RESULT_SCHEMA, optional={"tables": list, "meta": dict})
    names = record.get("tables", [])
    for key in names:
        if not (isinstance(key, str) and _TABLE_NAME.fullmatch(key)):
            raise DlmprobeInputError(f"{path}: field 'tables' should list plain table names, found {key!r}")
    tables = {key: _read_table(folder / f"{key}.csv") for key in names}
    return AnalysisResult(record["name"], record["title"], _read_table(folder / "table.csv"), None,
                          record["summary"], tables, record.get("meta", {}))


def _read_table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DlmprobeInputError(f"{path}: expected a CSV table, found {type(err).__name__} ({one_line(err)})") from None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)

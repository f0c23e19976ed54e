"""The SST-2 TSV files (``sentence<TAB>label`` with a header), as shipped in GLUE."""

from __future__ import annotations

import csv
from pathlib import Path


def read_sst2(path: str | Path, limit: int | None = None) -> tuple[list[str], list[int]]:
    """Sentences and 0/1 labels of an SST-2 TSV file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no SST-2 file at {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if rows and not {"sentence", "label"} <= set(rows[0]):
        raise ValueError(f"{path} needs 'sentence' and 'label' columns, found {sorted(rows[0])}")
    rows = rows[:limit] if limit is not None else rows
    return [row["sentence"].strip() for row in rows], [int(row["label"]) for row in rows]

"""``summary.csv``: one row per evaluation, next to what ``accelerator.log`` sends to the tracker."""
from __future__ import annotations

import csv
from pathlib import Path


def append_summary(path: Path, row: dict) -> None:
    """Append ``row``; when it brings new columns the file is rewritten with the union header."""
    path = Path(path)
    rows, header, rewrite = [], list(row), not path.exists()
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_header = reader.fieldnames or []
            if set(row) - set(old_header):
                rows, rewrite = list(reader), True
                header = old_header + [k for k in row if k not in old_header]
            else:
                header = old_header
    if rewrite:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, restval="")
            writer.writeheader()
            writer.writerows(rows)
    with path.open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=header, restval="").writerow(row)

"""JSON Lines files that survive a kill mid-write: append one row per finished unit of work; on
read, a torn last line (no newline, not valid JSON) is dropped, while damage anywhere else is an
error naming the file and line. Rows are written as strict JSON (NaN/inf as ``null``, as
``write_json`` does); older files with bare ``NaN`` still read."""

from __future__ import annotations

import json
from pathlib import Path

from common.provenance import json_safe


class JsonlError(ValueError):
    """A JSONL file is damaged before its last line."""


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # the last line has no newline: a write that was cut off
                continue
            raise JsonlError(f"{path}:{number}: not a JSON row ({exc.msg}); fix or delete that line") from exc
    return rows


def drop_torn_tail(path: str | Path) -> None:
    """Cut a last line that a killed writer left without its newline, so the next append starts clean."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(-1, 2)
        if fh.read(1) == b"\n":
            return
        fh.seek(0)
        data = fh.read()
        fh.truncate(data.rfind(b"\n") + 1)


def dumps_row(row: dict) -> str:
    """One row as a strict JSON line (what every JSONL writer writes)."""
    return json.dumps(json_safe(row), allow_nan=False)


def append_jsonl(path: str | Path, row: dict) -> None:
    path = Path(path)
    drop_torn_tail(path)
    with open(path, "a") as fh:
        fh.write(dumps_row(row) + "\n")
        fh.flush()

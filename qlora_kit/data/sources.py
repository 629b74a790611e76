"""Reading sources: local files, directories and globs of them, or hub datasets, into rows that know their origin."""

from __future__ import annotations

import glob
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_kit.errors import UserError
from qlora_kit.recipe import DataSource

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
GLOB_CHARS = "*?["


@dataclass
class Row:
    """One input row and where it came from, so errors can name the file and row."""

    data: dict[str, Any]
    where: str
    fmt: str = "auto"


class RowError(UserError):
    """A row that does not fit its format; ``kind`` is the short reason bad rows are counted by."""

    def __init__(self, where: str, message: str, kind: str) -> None:
        super().__init__(f"{where}: {message}")
        self.kind = kind


@dataclass
class BadRows:
    """Counts skipped rows by reason; more than ``limit`` of them raises the first one's error."""

    limit: int = 0
    reasons: Counter = field(default_factory=Counter)
    first: RowError | None = None

    def skip(self, error: RowError) -> None:
        self.first = self.first or error
        self.reasons[error.kind] += 1
        total = sum(self.reasons.values())
        if total > self.limit:
            if self.limit == 0:
                raise error
            raise UserError(f"{self.first} ({total} bad rows, more than data.max_bad_rows={self.limit})")


# ---------------------------------------------------------------------------------------------------------------
# Which files a path names


def local_files(path_text: str) -> list[Path] | None:
    """The data files a path names (a file, a directory, a glob), or None when it is not local (a hub id)."""
    path = Path(path_text).expanduser()
    if any(char in path_text for char in GLOB_CHARS):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
        files = [p for p in files if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES]
        if not files:
            raise UserError(f"data source {path_text}: the pattern matches no {'/'.join(LOCAL_SUFFIXES)} file")
        return files
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
        if not files:
            raise UserError(f"data source {path_text}: the directory holds no {'/'.join(LOCAL_SUFFIXES)} file")
        return files
    if path.is_file():
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise UserError(f"data file {path_text}: unsupported type; use one of {', '.join(LOCAL_SUFFIXES)}")
        return [path]
    if path.suffix.lower() in LOCAL_SUFFIXES or path_text.startswith((".", "/", "~")):
        raise UserError(f"data file {path_text} does not exist: check data.train[].path / data.eval.path")
    return None


def read_source(source: DataSource, bad: BadRows | None = None) -> list[Row]:
    """Read every row of a source, keeping the file and line or row number of each."""
    bad = bad or BadRows()
    files = local_files(source.path)
    if files is None:
        rows = _read_hub(source)
    else:
        rows = [row for path in files for row in _read_local(path, source, bad)]
    if not rows:
        raise UserError(f"data source {source.path} has no rows: give a file or split with at least one example")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Local files


def _read_local(path: Path, source: DataSource, bad: BadRows) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, bad)
    if suffix == ".json":
        return _read_json(path, bad)
    if suffix == ".txt":
        return _read_text(path, source.sample_by)
    return _read_table(path)


def _read_jsonl(path: Path, bad: BadRows) -> list[Row]:
    rows = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):  # JSON text may hold a raw U+2028
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            rows.append(_as_row(json.loads(line), where))
        except json.JSONDecodeError as exc:
            bad.skip(RowError(where, f"not valid JSON ({exc.msg}): each line must be one object", "invalid JSON"))
        except RowError as exc:
            bad.skip(exc)
    return rows


def read_text(path: Path) -> str:
    """A data file's text; bytes that are not UTF-8 are the user's to fix, named by line and byte offset."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{path} line {line}: not valid UTF-8 at byte offset {exc.start} (byte 0x{raw[exc.start]:02x}): "
            "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _read_json(path: Path, bad: BadRows) -> list[Row]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if isinstance(data, dict):  # {"data": [...]}-style wrappers: take the first list inside
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects (or JSON Lines in a .jsonl file)")
    rows = []
    for i, item in enumerate(data):
        try:
            rows.append(_as_row(item, f"{path} item {i}"))
        except RowError as exc:
            bad.skip(exc)
    return rows


def _read_text(path: Path, sample_by: str) -> list[Row]:
    text = read_text(path)
    if sample_by == "document":
        return [Row({"text": text}, str(path))] if text.strip() else []
    if sample_by == "paragraph":
        pieces, starts, line = [], [], 1
        for block in text.split("\n\n"):
            if block.strip():
                pieces.append(block.strip("\n"))
                starts.append(line)
            line += block.count("\n") + 2
        return [Row({"text": p}, f"{path} line {n}") for p, n in zip(pieces, starts, strict=True)]
    return [Row({"text": line}, f"{path} line {n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _read_table(path: Path) -> list[Row]:
    import pyarrow.parquet

    suffix = path.suffix.lower()
    kind = {".csv": "CSV", ".tsv": "TSV"}.get(suffix, "Parquet")
    try:
        table = _read_delimited(path, suffix) if kind != "Parquet" else pyarrow.parquet.read_table(path)
    except UserError:
        raise
    except Exception as exc:  # pyarrow raises several types for malformed files
        raise UserError(f"{path}: not a valid {kind} file: {_first_line(exc)}") from None
    # CSV rows are numbered as a spreadsheet shows them: the header is line 1.
    label, offset = ("line", 2) if kind != "Parquet" else ("row", 0)
    return [Row(item, f"{path} {label} {i + offset}") for i, item in enumerate(table.to_pylist())]


def _read_delimited(path: Path, suffix: str):
    """A CSV/TSV file with every column read as text: a cell holding " 52" is the text " 52", not the number 52."""
    import io

    import pyarrow as pa
    import pyarrow.csv

    raw = read_text(path).encode("utf-8")  # checks the encoding first, naming the line of a bad byte
    delimiter = "\t" if suffix == ".tsv" else ","
    parse = pyarrow.csv.ParseOptions(delimiter=delimiter)
    names = pyarrow.csv.open_csv(io.BytesIO(raw), parse_options=parse).schema.names  # the header row only
    convert = pyarrow.csv.ConvertOptions(column_types={name: pa.string() for name in names}, strings_can_be_null=False)
    return pyarrow.csv.read_csv(io.BytesIO(raw), parse_options=parse, convert_options=convert)


def _as_row(item: Any, where: str) -> Row:
    if not isinstance(item, dict):
        raise RowError(where, f"expected a JSON object, got {type(item).__name__}", "not an object")
    return Row(item, where)


# ---------------------------------------------------------------------------------------------------------------
# Hub datasets


def load_hub(source: DataSource):
    """The hub dataset split a source names (from the local datasets cache when offline)."""
    import datasets

    try:
        return datasets.load_dataset(source.path, source.name, split=source.split, revision=source.revision)
    except Exception as exc:  # offline, missing, or a bad split name: all are the user's to fix
        raise UserError(
            f"data source {source.path!r}: not a local file and could not be loaded from the hub "
            f"({_first_line(exc)}); check the path, name, split and revision, or your network"
        ) from None


def _read_hub(source: DataSource) -> list[Row]:
    return [Row(item, f"{source.path} row {i}") for i, item in enumerate(load_hub(source))]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__

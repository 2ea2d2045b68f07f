"""Reading data files into rows: JSON Lines, JSON, CSV, Parquet and saved `datasets` folders.

Each row comes with where it came from ("file.jsonl, line 3"). Whatever a file holds that
training cannot use is refused with that place, as a DataError, never a traceback: bytes that
are not UTF-8 text, JSON nested deeper than MAX_DEPTH, integers longer than MAX_DIGITS, CSV
cells over the csv module's field limit. A UTF-8 byte order mark is accepted.

It is also the one bounded reader every command reading a user's data file goes through (train,
data check, eval, classify --file, fit, the UI's data and eval actions): each text in a row is cut
as it is read to what `max_length` tokens can hold (`text_limit`), so one 60 MB line costs what a
long row costs on every path, not the gigabytes that tokenising all of it takes. (CSV cells are
bounded by the csv module's field limit already, and are not cut.)
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_DEPTH = 32  # a chat row needs 3 levels (messages -> message -> content); far more is a mistake
MAX_DIGITS = 4300  # Python's own limit for turning digits into an int (sys.get_int_max_str_digits)
# Text is decoded with errors="surrogateescape": a byte that is not UTF-8 becomes one of these.
_NOT_UTF8 = re.compile("[\udc80-\udcff]")
_RESAVE = "re-save the file as UTF-8 (e.g. 'Save as' > 'UTF-8' in a spreadsheet or text editor)"
# Ordinary text averages 3-5 characters per token, so (max_length + 1) * CHARS_PER_TOKEN characters
# hold every token a model reads (tokenising one 60 MB line whole took 9 GB).
CHARS_PER_TOKEN = 16
MAX_LENGTH_LIMIT = 131072  # the largest max_length a recipe allows: the bound when none is known


def text_limit(max_length: int | None) -> int:
    """The characters kept of each text read for a model reading `max_length` tokens: one more than
    `data.bounded` keeps, so a row cut here still counts as cut there."""
    return ((max_length or MAX_LENGTH_LIMIT) + 1) * CHARS_PER_TOKEN + 1


def read_rows(path: str | Path, max_length: int | None = None) -> list[tuple[str, Any]]:
    """Rows of a data file as (location, row) pairs; malformed content names its line.

    Every text in a row is cut to `text_limit(max_length)` characters (None: the largest
    max_length), so nothing downstream holds or tokenises more than a model can read.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if not path.is_dir() and path.suffix not in readers:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}"
            " or a saved `datasets` folder"
        )
    if not path.is_dir() and not path.is_file():  # a device or pipe could be read forever
        raise DataError(f"{path} is not a regular file")
    try:
        rows = _read_datasets_folder(path) if path.is_dir() else readers[path.suffix](path)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not rows:
        raise DataError(f"{path} is empty: it has no rows")
    if path.suffix == ".csv":  # cells are bounded already (the csv field limit), and a cell may hold
        return rows  # a chat as JSON text (a `messages` column), which a cut would break
    limit = text_limit(max_length)
    return [(where, _cut_texts(row, limit)) for where, row in rows]


def _cut_texts(value: Any, limit: int) -> Any:
    """The row with every string longer than `limit` cut to it (nesting is bounded by _check_row)."""
    if isinstance(value, str):
        return value[:limit] if len(value) > limit else value
    if isinstance(value, dict):
        return {k: _cut_texts(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_cut_texts(v, limit) for v in value]
    return value


# --- text --------------------------------------------------------------------------------------
def _open_text(path: Path, newline: str | None = None) -> Any:
    # utf-8-sig drops a byte order mark; surrogateescape lets _check_utf8 name a bad byte's line.
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def _utf8_lines(lines: Iterable[str], name: str) -> Iterator[str]:
    """The lines, refusing the first one that holds a byte that is not UTF-8."""
    for number, line in enumerate(lines, start=1):
        _check_utf8(line, name, number)
        yield line


def _check_utf8(text: str, name: str, first_line: int = 1) -> None:
    bad = _NOT_UTF8.search(text)
    if bad:
        line = first_line + text.count("\n", 0, bad.start())
        column = bad.start() - text.rfind("\n", 0, bad.start())
        raise DataError(
            f"{name}, line {line}, column {column}: byte 0x{ord(bad.group()) - 0xDC00:02x} "
            f"is not UTF-8 text; {_RESAVE}"
        )


# --- JSON ----------------------------------------------------------------------------------------
class _LongNumber:
    """An integer too long to convert, kept so the row check can name its field."""

    def __init__(self, digits: int):
        self.digits = digits


def _parse_int(text: str) -> int | _LongNumber:
    digits = len(text.lstrip("-"))
    return int(text) if digits <= MAX_DIGITS else _LongNumber(digits)


def _parse_json(text: str, name: str, line: int | None = None) -> Any:
    """One JSON value (a line's, or a whole file's when `line` is None); rows still need _check_row."""
    try:
        return json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{name}, line {line or e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
        ) from None
    except RecursionError:  # the C parser stops at Python's recursion limit (~1000 levels)
        where = f"{name}, line {line}" if line else name
        raise DataError(f"{where}: JSON nested deeper than {MAX_DEPTH} levels") from None


def parse_json_cell(text: str, place: str) -> Any:
    """A JSON value written inside a text cell (a CSV `messages` column), checked like a row."""
    try:
        value = json.loads(text, parse_int=_parse_int)
    except (json.JSONDecodeError, RecursionError):
        raise DataError(f"{place}: expected a list of messages as JSON text, got other text") from None
    return _check_row(value, place)


def _check_row(row: Any, where: str) -> Any:
    """Refuse nesting deeper than MAX_DEPTH and over-long integers, naming the top-level field."""
    stack = [(row, 0, None)]
    while stack:
        item, depth, field = stack.pop()
        if isinstance(item, _LongNumber):
            problem = f"a number with {item.digits} digits; numbers may have at most {MAX_DIGITS}"
        elif depth > MAX_DEPTH:
            problem = f"nested deeper than {MAX_DEPTH} levels"
        else:
            problem = None
        if problem:
            place = where if field is None else f"{where}, field {str(field)[:60]!r}"
            raise DataError(f"{place}: {problem}")
        if isinstance(item, dict):
            stack += [(v, depth + 1, k if depth == 0 else field) for k, v in item.items()]
        elif isinstance(item, list):
            stack += [(v, depth + 1, field) for v in item]
    return row


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    rows = []
    with _open_text(path) as f:
        for number, line in enumerate(_utf8_lines(f, path.name), start=1):
            if line.strip():
                where = f"{path.name}, line {number}"
                rows.append((where, _check_row(_parse_json(line, path.name, number), where)))
    return rows


def _read_json(path: Path) -> list[tuple[str, Any]]:
    with _open_text(path) as f:
        text = f.read()
    _check_utf8(text, path.name)
    if not text.strip():
        return []
    data = _parse_json(text, path.name)
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}-style wrappers
    if not isinstance(data, list):
        raise DataError(f"{path.name}: expected a JSON list of rows, got a {type(data).__name__}")
    rows = [(f"{path.name}, row {i}", row) for i, row in enumerate(data, start=1)]
    return [(where, _check_row(row, where)) for where, row in rows]


# --- CSV -----------------------------------------------------------------------------------------
class _Tape:
    """Lines handed to the csv reader, remembering those of the record being read (for errors)."""

    def __init__(self, lines: Iterator[str]):
        self.lines, self.record = lines, []

    def __iter__(self) -> _Tape:
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        self.record.append(line)
        return line


def _read_csv(path: Path) -> list[tuple[str, Any]]:
    """Rows as {header: cell} dicts (missing cells are None), like csv.DictReader."""
    rows: list[tuple[str, Any]] = []
    header: list[str] | None = None
    with _open_text(path, newline="") as f:
        tape = _Tape(_utf8_lines(f, path.name))
        reader = csv.reader(tape)
        try:
            for record in reader:
                tape.record.clear()
                where = f"{path.name}, line {reader.line_num}"
                if header is None:
                    header = record or None  # the first non-blank line
                elif len(record) > len(header):
                    raise DataError(f"{where}: more values than the header has columns")
                elif record:  # blank lines are skipped
                    cells = record + [None] * (len(header) - len(record))
                    rows.append((where, dict(zip(header, cells, strict=True))))
        except csv.Error as e:
            where = f"{path.name}, line {reader.line_num}"
            raise DataError(f"{where}{_csv_problem(e, tape.record, header)}") from None
    return rows


def _csv_problem(error: csv.Error, record: list[str], header: list[str] | None) -> str:
    limit = csv.field_size_limit()
    if "field limit" not in str(error):
        return f": not valid CSV ({error})"
    column = _long_cell_column("".join(record), limit)
    if header is None:
        field = ", the header"
    else:
        field = f", field {header[column]!r}" if column < len(header) else f", column {column + 1}"
    return f"{field}: a cell is longer than {limit} characters, the most a CSV cell may hold; put long texts in a .jsonl file"


def _long_cell_column(record: str, limit: int) -> int:
    """The 0-based column of the first cell over `limit` characters in one CSV record."""
    column, size, quoted, i = 0, 0, False, 0
    while i < len(record):
        char = record[i]
        if quoted and char == '"' and record[i + 1 : i + 2] == '"':  # "" is a quote inside quotes
            size, i = size + 1, i + 1
        elif quoted and char == '"':
            quoted = False
        elif char == '"' and size == 0:
            quoted = True
        elif char == "," and not quoted:
            column, size = column + 1, 0
        else:
            size += 1
            if size > limit:
                return column
        i += 1
    return column


# --- Parquet and datasets folders ------------------------------------------------------------------
def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    from datasets import Dataset

    try:
        table = Dataset.from_parquet(str(path))
    except Exception as e:
        raise DataError(f"{path.name}: not a readable Parquet file ({e})") from None
    return [(f"{path.name}, row {i}", row) for i, row in enumerate(table, start=1)]


def _read_datasets_folder(path: Path) -> list[tuple[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a saved `datasets` folder ({e})") from None
    if isinstance(data, DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    return [(f"{path.name}, row {i}", row) for i, row in enumerate(data, start=1)]

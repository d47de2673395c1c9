"""Import a file into the store: JSON lines, a JSON array, CSV, parquet, or a folder that
``datasets.Dataset.save_to_disk`` wrote, as one new dataset version.

Everything is checked before anything is written, and every problem found (up to
MAX_PROBLEMS, then a count) is reported with its file, line or row, column and fix. The
version's lineage names the source: its absolute path and the sha256 of its content.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sys
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flywheel.store.datasets import DatasetRef, invalid_text
from flywheel.store.models import FileRef
from flywheel.store.naming import StoreError, validate_name
from flywheel.store.publish import write_dataset

FORMATS = ("jsonl", "json", "csv", "parquet", "hf")
SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",  # JSON lines unless --format json says it is one array
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
MAX_FIELD_BYTES = 1_000_000
MAX_PROBLEMS = 20
PREVIEW_CHARS = 40  # an oversized value is never echoed beyond this
CHAT_ROLES = ("system", "user", "assistant", "tool")
CHAT_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
BOM = b"\xef\xbb\xbf"
# Control characters (C0, DEL, C1) other than tab and newline.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_CSV_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")  # no leading zeros: "007" stays text
_CSV_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_CHAR_NAMES = {"\x00": "NUL", "\r": "carriage return, CR", "\x1b": "escape", "\x7f": "DEL"}


class ImportRefused(StoreError):
    """The source cannot be imported as it is; nothing was written. ``str()`` is the
    whole report: the file, then one line per problem (where it is, what, the fix)."""

    def __init__(self, path: Path | str, fmt: str | None, problems: list[str], total: int):
        self.path = str(path)
        self.format = fmt
        self.problems = problems
        self.total = total
        kind = f" ({fmt})" if fmt else ""
        noun = "problem" if total == 1 else "problems"
        lines = [f"cannot import {self.path}{kind}: {total} {noun}, nothing was written"]
        lines += [f"  {p}" for p in problems]
        if total > len(problems):
            lines.append(f"  ... and {total - len(problems)} more (fix these and run again)")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class ImportReport:
    """What an import wrote."""

    ref: DatasetRef
    rows: int  # rows written
    duplicates: int  # rows identical to an earlier row (all columns, after --map)
    dropped: int  # duplicates left out (--drop-duplicates), else 0
    columns: dict[str, str]  # name -> type as stored
    text_columns: list[str]
    chat_columns: list[str]
    source: str  # absolute path
    sha256: str
    format: str
    first_duplicate: str | None = None  # e.g. "line 7 repeats line 2"

    def summary(self) -> str:
        """The report as the CLI prints it."""
        rows = "row" if self.duplicates == 1 else "rows"
        if not self.duplicates:
            dups = "no duplicate rows"
        elif self.dropped:
            dups = f"{self.duplicates} duplicate {rows} dropped (the first of each kept)"
        else:
            dups = f"{self.duplicates} duplicate {rows} kept (--drop-duplicates drops them)"
        if self.first_duplicate:
            dups += f"; first: {self.first_duplicate}"
        width = max(len(c) for c in self.columns)
        chat, text = self.chat_columns, self.text_columns
        lines = [
            f"imported {self.source} ({self.format}) as {self.ref.name}@{self.ref.version}",
            f"rows: {self.rows} ({dups})",
            "columns:",
        ]
        for name, kind in self.columns.items():
            tags = [t for t, cols in (("chat", chat), ("text", text)) if name in cols]
            lines.append(f"  {name:<{width}}  {kind}" + (f"  ({', '.join(tags)})" if tags else ""))
        lines.append(f"source: {self.source} sha256:{self.sha256}")
        return "\n".join(lines)


class _Problems:
    """The first MAX_PROBLEMS problems, and how many there were in all."""

    def __init__(self) -> None:
        self.shown: list[str] = []
        self.total = 0

    def add(self, text: str) -> None:
        self.total += 1
        if len(self.shown) < MAX_PROBLEMS:
            self.shown.append(text)

    def __bool__(self) -> bool:
        return self.total > 0


@dataclass
class _Source:
    """Rows read from a source, before any check of their values."""

    columns: list[str]
    rows: list[dict[str, Any]]
    where: list[str]  # "line 3", "row 5 (0-based)", one per row
    null_word: str = "null"  # how a missing value looks in the source ("empty" in CSV)
    table: pa.Table | None = None  # parquet/hf: the typed table itself
    types: dict[str, pa.DataType] = field(default_factory=dict)  # csv: inferred types


class _BadJSON(ValueError):
    """Valid JSON syntax that Python would read silently wrong (NaN, repeated keys)."""


class _Shape(ValueError):
    """A value parquet cannot store as one column type."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _BadJSON(f"the key {key!r} appears twice in one object (keep one)")
        obj[key] = value
    return obj


def _constant(name: str) -> Any:
    raise _BadJSON(f"{name} is not valid JSON (write null, or the number as a string)")


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant)


def _json_kind(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "number")


def _a(value: Any) -> str:
    """ "an array", "a string": the value's JSON kind with its article."""
    kind = _json_kind(value)
    return ("an " if kind[0] in "ao" else "a ") + kind


def parse_column_map(items: Sequence[str]) -> dict[str, str]:
    """``["src=dst", ...]`` (the CLI's repeated --map) as {src: dst}."""
    mapping: dict[str, str] = {}
    for item in items:
        source, sep, target = item.partition("=")
        if not sep or not source or not target:
            raise ValueError(f"--map {item!r}: write SOURCE=TARGET, e.g. --map prompt=instruction")
        if source in mapping:
            raise ValueError(
                f"--map {item!r}: {source!r} is already mapped to {mapping[source]!r}; map each "
                "source column once"
            )
        mapping[source] = target
    return mapping


def source_sha256(path: Path) -> str:
    """sha256 of a file's bytes; of a folder, of each file's relative path, size and bytes,
    in sorted path order."""
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = file.relative_to(path).as_posix()
            digest.update(f"{rel}\0{file.stat().st_size}\0".encode())
            _hash_file(digest, file)
    else:
        _hash_file(digest, path)
    return digest.hexdigest()


def _hash_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ImportRefused(
                path, None, [f"unknown --format {fmt!r}: use one of {', '.join(FORMATS)}"], 1
            )
        if path.is_dir() != (fmt == "hf"):
            what = "a folder" if path.is_dir() else "a file"
            fix = (
                "--format hf reads a folder that Dataset.save_to_disk wrote"
                if fmt == "hf"
                else "a folder imports as --format hf (a saved datasets.Dataset)"
            )
            raise ImportRefused(path, fmt, [f"the path is {what}: {fix}"], 1)
        return fmt
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[suffix]
    raise ImportRefused(
        path,
        None,
        [
            f"cannot tell the format from the suffix {suffix or '(none)'!r}: pass --format "
            f"{'|'.join(FORMATS)} (compressed files: decompress them first)"
        ],
        1,
    )


# ---- reading: bytes to rows ----------------------------------------------------------------


def _text_lines(
    data: bytes, problems: _Problems, *, allow_bom: bool, allow_crlf: bool
) -> list[tuple[int, str]] | None:
    """(line number, text) of every line that is valid UTF-8, line endings removed; None
    when the bytes cannot be read as lines of UTF-8 text at all."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        problems.add(
            "line 1: the file starts with a UTF-16 byte-order mark: it is UTF-16 text, not "
            "UTF-8; convert it, e.g. `iconv -f UTF-16 -t UTF-8 FILE > FIXED`"
        )
        return None
    offset = 0
    if data.startswith(BOM):
        if not allow_bom:
            problems.add(
                "line 1: the file starts with a UTF-8 byte-order mark (BOM, bytes ef bb bf); "
                "re-save it without one (e.g. `sed -i '1s/^\\xEF\\xBB\\xBF//' FILE`), or pass "
                "--allow-bom to strip it"
            )
        data, offset = data[len(BOM) :], len(BOM)
    lines: list[tuple[int, str]] = []
    crlf: list[int] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        start = offset
        offset += len(raw) + 1
        if raw.endswith(b"\r"):
            crlf.append(number)
            raw = raw[:-1]
        try:
            lines.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            bad = raw[e.start : max(e.end, e.start + 1)].hex(" ")
            problems.add(
                f"line {number}, byte offset {start + e.start} of the file ({e.start} into the "
                f"line): bytes {bad} are not valid UTF-8 ({e.reason}); re-save the file as "
                "UTF-8 from its real encoding, e.g. `iconv -f latin1 -t utf-8 FILE > FIXED`"
            )
    if crlf and not allow_crlf:
        problems.add(
            f"line {crlf[0]}: ends in CRLF (Windows line endings; {len(crlf)} lines do); "
            "convert them with `sed -i 's/\\r$//' FILE` (or dos2unix), or pass --allow-crlf to "
            "strip the CRs"
        )
    return lines


def _read_jsonl(lines: list[tuple[int, str]], problems: _Problems) -> _Source:
    source = _Source(columns=[], rows=[], where=[])
    body = [(n, t) for n, t in lines if t.strip()]
    first = body[0][1].lstrip() if body else ""
    if first.startswith(("[", "{")):
        # one JSON document spread over the lines is a common mistake: say so once
        try:
            whole = _DECODER.decode("\n".join(t for _, t in lines))
        except ValueError:
            whole = None
        if isinstance(whole, list):
            problems.add(
                f"line {body[0][0]}: the file is one JSON array ({len(whole)} items), not JSON "
                "lines; convert it with `jq -c '.[]' FILE > FILE.jsonl`, or import it as it "
                "is with --format json"
            )
            return source
        if isinstance(whole, dict) and len(body) > 1:
            problems.add(
                f"line {body[0][0]}: the file is one JSON object spread over {len(body)} lines, "
                "not JSON lines (one object per line); put each record on one line, e.g. "
                "`jq -c . FILE > FILE.jsonl`"
            )
            return source
    for number, text in body:
        try:
            value = _DECODER.decode(text)
        except json.JSONDecodeError as e:
            problems.add(
                f"line {number}: not valid JSON: {e.msg} at character {e.colno}; fix the line "
                "(each line is one JSON object)"
            )
            continue
        except _BadJSON as e:
            problems.add(f"line {number}: {e}")
            continue
        if not isinstance(value, dict):
            problems.add(
                f"line {number}: a JSON {_json_kind(value)}, not an object; each line must be "
                'one JSON object, like {"text": "..."}'
            )
            continue
        _add_json_row(source, value, f"line {number}")
    return source


def _read_json_array(lines: list[tuple[int, str]], problems: _Problems) -> _Source:
    source = _Source(columns=[], rows=[], where=[])
    try:
        value = _DECODER.decode("\n".join(t for _, t in lines))
    except json.JSONDecodeError as e:
        problems.add(f"line {e.lineno}: not valid JSON: {e.msg} at character {e.colno}")
        return source
    except _BadJSON as e:
        problems.add(str(e))
        return source
    if not isinstance(value, list):
        problems.add(
            f"the file holds one JSON {_json_kind(value)}, not an array: --format json reads "
            "one array of objects (JSON lines, one object per line, is --format jsonl)"
        )
        return source
    for i, item in enumerate(value):
        if isinstance(item, dict):
            _add_json_row(source, item, f"item {i} (0-based)")
        else:
            problems.add(
                f"item {i} (0-based): a JSON {_json_kind(item)}, not an object; every item of "
                "the array must be one JSON object"
            )
    return source


def _add_json_row(source: _Source, row: dict[str, Any], where: str) -> None:
    for key in row:
        if key not in source.types:  # types doubles as an ordered set of the keys seen
            source.types[key] = pa.null()
            source.columns.append(key)
    source.rows.append(row)
    source.where.append(where)


def _read_csv(lines: list[tuple[int, str]], problems: _Problems) -> _Source:
    source = _Source(columns=[], rows=[], where=[], null_word="empty")
    # Fields up to --max-field-bytes (and beyond: the size check reports them better than
    # the csv module's own limit of 128 KiB).
    csv.field_size_limit(max(csv.field_size_limit(), sys.maxsize >> 32))
    reader = csv.reader(io.StringIO("\n".join(t for _, t in lines), newline=""), strict=True)
    header: list[str] | None = None
    cells: list[list[str]] = []
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            problems.add(
                f"line {start}: not valid CSV ({e}, at line {reader.line_num}); check the "
                "quoting of the record that starts here (a quote that is never closed?)"
            )
            return source
        if not record:
            continue
        if header is None:
            header = record
            seen: dict[str, int] = {}
            for i, name in enumerate(header, start=1):
                if not name.strip():
                    problems.add(f"line {start}: header column {i} has no name; name it")
                elif name in seen:
                    problems.add(
                        f"line {start}: the header names {name!r} twice (columns {seen[name]} "
                        f"and {i}); rename one"
                    )
                seen.setdefault(name, i)
            continue
        if len(record) != len(header):
            problems.add(
                f"line {start}: {len(record)} fields, but the header has {len(header)}; quote "
                'values that hold commas ("a, b") and check for missing fields'
            )
            continue
        cells.append(record)
        source.where.append(f"line {start}")
    if header is None:
        return source
    source.columns = header
    columns = list(zip(*cells, strict=True)) if cells else [() for _ in header]
    converted = []
    for name, values in zip(header, columns, strict=True):
        filled = [v for v in values if v != ""]
        if filled and all(_CSV_INT.fullmatch(v) and _fits_int64(int(v)) for v in filled):
            kind, convert = pa.int64(), int
        elif filled and all(_CSV_FLOAT.fullmatch(v) for v in filled):
            kind, convert = pa.float64(), float
        else:
            kind, convert = pa.string(), str
        source.types[name] = kind
        converted.append([None if v == "" else convert(v) for v in values])
    source.rows = [dict(zip(header, row, strict=True)) for row in zip(*converted, strict=True)]
    return source


def _fits_int64(value: int) -> bool:
    return INT64_MIN <= value <= INT64_MAX


def _from_table(table: pa.Table, problems: _Problems) -> _Source:
    source = _Source(columns=list(table.column_names), rows=[], where=[], table=table)
    seen: set[str] = set()
    for name in table.column_names:
        if name in seen:
            problems.add(f"column {name!r}: appears twice in the file; rename one")
        seen.add(name)
    for name, row, reason in invalid_text(table):
        problems.add(
            f"row {max(row, 0)} (0-based), column {name!r}: the text is not valid "
            f"UTF-8 ({reason}); re-encode it as UTF-8 where the file was written"
        )
    if problems:
        return source
    try:
        source.rows = table.to_pylist()
    except (pa.ArrowException, ValueError, TypeError) as e:
        problems.add(f"the rows cannot be read as values: {e}")
        return source
    source.where = [f"row {i} (0-based)" for i in range(len(source.rows))]
    return source


def _read_parquet(data: bytes, problems: _Problems) -> _Source | None:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as e:
        problems.add(
            f"not a readable parquet file ({_one_line(e)}); if it is another format, say so "
            "with --format"
        )
        return None
    return _from_table(table, problems)


def _read_hf(path: Path, split: str | None, problems: _Problems) -> _Source | None:
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        if split is None:
            problems.add(
                f"the folder holds a DatasetDict with splits {', '.join(splits)}: pass --split "
                "NAME to import one of them"
            )
            return None
        if split not in splits:
            problems.add(f"--split {split!r}: no such split; splits: {', '.join(splits)}")
            return None
    elif (path / "state.json").is_file():
        if split is not None:
            problems.add(
                f"--split {split!r}: the folder holds one Dataset, not a DatasetDict with "
                "splits; leave out --split"
            )
            return None
    else:
        problems.add(
            "not a folder that datasets' save_to_disk wrote (it has no state.json or "
            "dataset_dict.json); point at such a folder, or at a single file"
        )
        return None
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
        dataset = loaded[split] if split is not None else loaded
        table = dataset.with_format("arrow")[:]
    except Exception as e:  # any failure to load it is a property of the folder
        problems.add(f"datasets.load_from_disk cannot load the folder: {_one_line(e)}")
        return None
    return _from_table(table, problems)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# ---- checking values ------------------------------------------------------------------------


def _json_type(value: Any) -> pa.DataType:
    """The arrow type that stores a JSON value; _Shape when there is none."""
    if value is None:
        return pa.null()
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        if not _fits_int64(value):
            raise _Shape(f"the integer {value} does not fit in 64 bits; write it as a string")
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    if isinstance(value, str):
        return pa.string()
    if isinstance(value, list):
        kind = pa.null()
        for i, item in enumerate(value):
            item_kind = _json_type(item)
            merged = _merge(kind, item_kind)
            if merged is None:
                raise _Shape(
                    f"a list mixing {_describe(kind)} and {_describe(item_kind)} (item {i}); "
                    "a list holds one type"
                )
            kind = merged
        return pa.list_(kind)
    if isinstance(value, dict):
        if not value:
            raise _Shape("an empty object {} (parquet cannot store it); write null instead")
        return pa.struct([(key, _json_type(v)) for key, v in value.items()])
    raise _Shape(f"a value of type {type(value).__name__}")


def _merge(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """One type for values of types a and b (null fits any, integers widen to numbers),
    or None when there is none."""
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    numbers = (pa.int64(), pa.float64())
    if a in numbers and b in numbers:
        return pa.float64()
    if pa.types.is_list(a) and pa.types.is_list(b):
        inner = _merge(a.value_type, b.value_type)
        return None if inner is None else pa.list_(inner)
    if pa.types.is_struct(a) and pa.types.is_struct(b):
        fields = {a.field(i).name: a.field(i).type for i in range(a.num_fields)}
        for i in range(b.num_fields):
            name, kind = b.field(i).name, b.field(i).type
            merged = _merge(fields.get(name, pa.null()), kind)
            if merged is None:
                return None
            fields[name] = merged
        return pa.struct(list(fields.items()))
    return None


def _describe(kind: pa.DataType) -> str:
    names = {pa.null(): "null", pa.bool_(): "boolean", pa.int64(): "integer"}
    names |= {pa.float64(): "number", pa.string(): "string"}
    if kind in names:
        return names[kind]
    if kind == CHAT_TYPE:
        return "chat messages"
    if pa.types.is_list(kind):
        inner = kind.value_type
        return "an empty list" if pa.types.is_null(inner) else f"list of {_describe(inner)}"
    if pa.types.is_struct(kind):
        fields = ", ".join(
            f"{kind.field(i).name}: {_describe(kind.field(i).type)}" for i in range(kind.num_fields)
        )
        return f"object {{{fields}}}"
    return str(kind)


def _describe_value(value: Any) -> str:
    try:
        return _describe(_json_type(value))
    except _Shape:
        return _json_kind(value)


def _looks_like_chat(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and isinstance(value[0], dict)
        and ("role" in value[0] or "content" in value[0])
    )


def _is_chat_type(kind: pa.DataType) -> bool:
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        return False
    item = kind.value_type
    if not pa.types.is_struct(item):
        return False
    names = {item.field(i).name for i in range(item.num_fields)}
    return "role" in names or "content" in names


def _chat_problem(value: Any) -> str | None:
    """What is wrong with a chat value (a list of {role, content} messages), if anything."""
    if not isinstance(value, list):
        return f"{_describe_value(value)}, not chat messages (a list of {{role, content}})"
    if not value:
        return "an empty conversation (no messages); give it at least one message or drop the row"
    for i, message in enumerate(value):
        where = f"message {i} (0-based)"
        if not isinstance(message, dict):
            return f"{where} is {_a(message)}, not an object {{role, content}}"
        extra = sorted(
            k for k, v in message.items() if k not in ("role", "content") and v is not None
        )
        if extra:
            return (
                f"{where} has the key {extra[0]!r}: a chat message holds only role and content "
                "(drop the other keys, or keep them in a column of their own)"
            )
        for key in ("role", "content"):
            if message.get(key) is None:
                return f"{where} has no {key!r}; every message needs a role and a content"
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            return f"{where} has the role {role!r}; roles are {', '.join(CHAT_ROLES)}"
        if not isinstance(content, str):
            return f"{where} has a content that is {_a(content)}, not a string"
        if not content.strip():
            return f"{where} has empty content; write the message or drop it"
        problem = _text_problem(content)
        if problem:
            return f"{where} content {problem}"
    return None


def _text_problem(text: str) -> str | None:
    """A control character or lone surrogate in a string, if any."""
    match = _CONTROL.search(text)
    if match:
        char = match.group()
        name = _CHAR_NAMES.get(char) or unicodedata.name(char, "control character")
        fix = "replace \\r\\n with \\n" if char == "\r" else "remove it"
        return (
            f"holds the control character U+{ord(char):04X} ({name}) at character "
            f"{match.start()}: {fix} (text may hold tabs and newlines, no other control "
            "characters)"
        )
    match = _SURROGATE.search(text)
    if match:
        return (
            f"holds U+{ord(match.group()):04X} at character {match.start()}, half of a UTF-16 "
            "surrogate pair that UTF-8 cannot store (a broken \\u escape); fix the source text"
        )
    return None


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def _size(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, dict | list | tuple):
        return len(json.dumps(value, ensure_ascii=False, default=str).encode("utf-8", "replace"))
    return 0  # numbers, booleans, dates: small


def _preview(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return repr(text[:PREVIEW_CHARS])


@dataclass
class _Plan:
    """What the checks decided: the columns' names and types, and the text columns."""

    columns: list[str]
    types: dict[str, pa.DataType]
    text: list[str]
    chat: list[str]


def _check(
    source: _Source,
    problems: _Problems,
    *,
    column_map: Mapping[str, str],
    require: Sequence[str],
    text: Sequence[str] | None,
    max_field_bytes: int,
) -> _Plan | None:
    # Column problems stop the checks (every row would repeat them); problems the reading
    # found before do not.
    before = problems.total
    present = ", ".join(map(repr, source.columns)) or "none"
    # renames
    for old, new in column_map.items():
        if old not in source.columns:
            problems.add(f"--map {old}={new}: the file has no column {old!r}; columns: {present}")
    names = [column_map.get(c, c) for c in source.columns]
    for i, name in enumerate(names):
        sources = [c for c, n in zip(source.columns, names, strict=True) if n == name]
        # names repeated in the source itself were reported when it was read
        if name in names[:i] and any(c in column_map for c in sources):
            problems.add(
                f"--map: {' and '.join(map(repr, sources))} would both be named {name!r}; map "
                "them to different names"
            )
    for name in names:
        if not name.strip():
            problems.add(
                "a column with an empty name; give it one in the file (or --map it, in CSV)"
            )
    if problems.total > before:
        return None
    if column_map:
        source.rows = [{column_map.get(k, k): v for k, v in row.items()} for row in source.rows]
        source.types = {column_map.get(k, k): v for k, v in source.types.items()}
    after = ", ".join(map(repr, names))
    for name in dict.fromkeys([*require, *(text or [])]):
        if name not in names:
            flag = "--require" if name in require else "--text"
            problems.add(
                f"missing column {name!r} ({flag}); columns present: {after}; rename one to it "
                f"with --map SOURCE={name}"
            )
    if problems.total > before:
        return None

    # types: parquet/hf tables carry them; JSON values must keep one type per column
    types: dict[str, pa.DataType] = {}
    chat: list[str] = []
    mistyped: set[str] = set()
    for name in names:
        values = [row.get(name) for row in source.rows]
        if source.table is not None:
            types[name] = source.table.schema.field(names.index(name)).type
            if _is_chat_type(types[name]):
                chat.append(name)
            continue
        if source.types.get(name) is not None and not pa.types.is_null(source.types[name]):
            types[name] = source.types[name]  # CSV: inferred from the cells
            continue
        if any(_looks_like_chat(v) for v in values):
            chat.append(name)
            types[name] = CHAT_TYPE
            continue
        kind, first = pa.null(), None
        for i, value in enumerate(values):
            if value is None:
                continue
            try:
                value_kind = _json_type(value)
            except _Shape as e:
                problems.add(f"{source.where[i]}, column {name!r}: {e}")
                mistyped.add(name)
                break
            merged = _merge(kind, value_kind)
            if merged is None:
                problems.add(
                    f"{source.where[i]}, column {name!r}: holds {_describe(value_kind)}, but "
                    f"{source.where[first]} holds {_describe(kind)}; a column holds one type "
                    "in every row: fix the value (quote numbers as strings, or use null)"
                )
                mistyped.add(name)
                break
            first = i if first is None else first
            kind = merged
        types[name] = kind
    if text is None:
        text_columns = [
            n for n in names if n in chat or any(isinstance(r.get(n), str) for r in source.rows)
        ]
    else:
        text_columns = list(dict.fromkeys(text))
        for name in text_columns:
            kind = types[name]
            if name in chat or name in mistyped or pa.types.is_null(kind):
                continue
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                i = next(i for i, r in enumerate(source.rows) if r.get(name) is not None)
                problems.add(
                    f"{source.where[i]}, column {name!r}: holds {_describe(kind)}, not text "
                    "(a --text column); name only text columns in --text"
                )
                mistyped.add(name)

    # every value
    for i, row in enumerate(source.rows):
        where = source.where[i]
        for name in names:
            value = row.get(name)
            if name in require and name not in row and name not in text_columns:
                problems.add(f"{where}, column {name!r}: missing (a --require column); add it")
                continue
            size = _size(value)
            if size > max_field_bytes:
                problems.add(
                    f"{where}, column {name!r}: the value is {size:,} bytes, above the limit "
                    f"of {max_field_bytes:,} (--max-field-bytes); it starts {_preview(value)}; "
                    "shorten it, or raise --max-field-bytes"
                )
                continue
            if name in text_columns and name not in mistyped:
                missing = source.table is None and source.null_word == "null" and name not in row
                if value is None:
                    what = f"has no {name!r} key" if missing else f"is {source.null_word}"
                    problems.add(
                        f"{where}, column {name!r}: {what}, and it is a text column; fill it "
                        "in or drop the row (or name the text columns with --text)"
                    )
                    continue
                if isinstance(value, str) and not value.strip():
                    blank = "empty" if not value else "only whitespace"
                    problems.add(
                        f"{where}, column {name!r}: the text is {blank}; fill it in or drop "
                        "the row (or name the text columns with --text)"
                    )
                    continue
            if name in chat and value is not None:
                problem = _chat_problem(value)
                if problem:
                    problems.add(f"{where}, column {name!r}: {problem}")
                continue
            for string in _strings(value):
                problem = _text_problem(string)
                if problem:
                    problems.add(f"{where}, column {name!r}: the text {problem}")
                    break
    return _Plan(columns=names, types=types, text=text_columns, chat=chat)


# ---- building the table ---------------------------------------------------------------------


def _chat_value(value: Any) -> list[dict[str, str]] | None:
    if value is None:
        return None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _build(source: _Source, plan: _Plan, keep: list[int]) -> pa.Table:
    if source.table is not None:
        table = source.table.rename_columns(plan.columns).replace_schema_metadata(None)
        for name in plan.chat:
            values = [_chat_value(row[name]) for row in source.rows]
            index = plan.columns.index(name)
            table = table.set_column(index, name, pa.array(values, type=CHAT_TYPE))
        return table.take(keep) if len(keep) < table.num_rows else table
    arrays = []
    for name in plan.columns:
        kind = plan.types[name]
        values = [source.rows[i].get(name) for i in keep]
        if name in plan.chat:
            values = [_chat_value(v) for v in values]
        elif kind == pa.float64():
            values = [None if v is None else float(v) for v in values]
        arrays.append(pa.array(values, type=kind))
    return pa.Table.from_arrays(arrays, names=plan.columns)


def _duplicates(source: _Source, plan: _Plan) -> tuple[list[int], str | None]:
    """Index of the first row of each distinct row, and "line 7 repeats line 2" for the
    first duplicate."""
    seen: dict[str, int] = {}
    first: list[int] = []
    example = None
    for i, row in enumerate(source.rows):
        values = []
        for name in plan.columns:
            value = row.get(name)
            if name in plan.chat:
                value = _chat_value(value)
            elif plan.types[name] == pa.float64() and value is not None:
                value = float(value)
            values.append(value)
        key = json.dumps(values, sort_keys=True, ensure_ascii=False, default=repr)
        if key in seen:
            example = example or f"{source.where[i]} repeats {source.where[seen[key]]}"
        else:
            seen[key] = i
            first.append(i)
    return first, example


def import_file(
    path: Path | str,
    name: str,
    *,
    format: str | None = None,
    split: str | None = None,
    column_map: Mapping[str, str] | None = None,
    require: Sequence[str] = (),
    text: Sequence[str] | None = None,
    max_field_bytes: int = MAX_FIELD_BYTES,
    allow_bom: bool = False,
    allow_crlf: bool = False,
    drop_duplicates: bool = False,
    root: Path | None = None,
) -> ImportReport:
    """Check a file and write it as a new version of dataset ``name``, or raise
    ImportRefused listing its problems (nothing written).

    ``format``: jsonl, json (one array of objects), csv, parquet or hf (a folder that
    ``Dataset.save_to_disk`` wrote; ``split`` picks one of a DatasetDict's); by default
    from the suffix (a folder is hf). ``column_map`` renames columns (source -> target);
    ``require`` names columns that must exist after renaming; ``text`` names the columns
    that must hold non-empty text (default: every column holding a string in some row, and
    every chat column: lists of {role, content} messages). CSV cells that are all integers
    (or all numbers) become integer (or float) columns, empty cells null.
    """
    validate_name(name)
    if max_field_bytes < 1:
        raise ValueError(f"max_field_bytes must be at least 1, not {max_field_bytes}")
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise ImportRefused(path, format, ["no such file or folder"], 1)
    fmt = _format_of(path, format)
    problems = _Problems()
    source: _Source | None
    try:
        if fmt == "hf":
            sha256 = source_sha256(path)
            source = _read_hf(path, split, problems)
        else:
            if split is not None:
                raise ImportRefused(path, fmt, ["--split is for a saved DatasetDict folder"], 1)
            data = path.read_bytes()
            sha256 = hashlib.sha256(data).hexdigest()
            if fmt == "parquet":
                source = _read_parquet(data, problems)
            else:
                lines = _text_lines(data, problems, allow_bom=allow_bom, allow_crlf=allow_crlf)
                readers = {"jsonl": _read_jsonl, "json": _read_json_array, "csv": _read_csv}
                source = None if lines is None else readers[fmt](lines, problems)
    except OSError as e:
        raise ImportRefused(path, fmt, [f"cannot read it: {e}"], 1) from None
    if source is not None and not source.rows and not problems:
        problems.add("no rows: the source holds no records to import")
    plan = None
    if source is not None and source.rows:
        plan = _check(
            source,
            problems,
            column_map=dict(column_map or {}),
            require=list(require),
            text=None if text is None else list(text),
            max_field_bytes=max_field_bytes,
        )
    if problems or source is None or plan is None:
        raise ImportRefused(path, fmt, problems.shown, problems.total)

    first, example = _duplicates(source, plan)
    duplicates = len(source.rows) - len(first)
    keep = first if drop_duplicates else list(range(len(source.rows)))
    try:
        table = _build(source, plan, keep)
    except (pa.ArrowException, ValueError, TypeError, OverflowError) as e:
        raise ImportRefused(path, fmt, [f"the rows cannot be stored: {_one_line(e)}"], 1) from None
    ref = write_dataset(
        name,
        table,
        produced_by="import",
        inputs=[FileRef(path=str(path), sha256=sha256)],
        root=root,
    )
    return ImportReport(
        ref=ref,
        rows=table.num_rows,
        duplicates=duplicates,
        dropped=duplicates if drop_duplicates else 0,
        columns={f.name: str(f.type) for f in table.schema},
        text_columns=plan.text,
        chat_columns=plan.chat,
        source=str(path),
        sha256=sha256,
        format=fmt,
        first_duplicate=example,
    )

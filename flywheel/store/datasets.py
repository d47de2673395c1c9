"""Datasets on disk: ``<root>/<name>/<version>/part-*.parquet`` plus ``_meta.json``.

A version is written into a temporary folder and renamed into place, so readers
never see half a version, and a version folder never changes once it exists.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

MAX_NAME_LENGTH = 63
MAX_VERSION_LENGTH = 80
FAILED_SUFFIX = "__failed"
# The catalog names a dataset's latest view `<name>` and a version's view
# `<name>__<version>`. A name holds "__" only in the suffix FAILED_SUFFIX and never ends in
# "_", so in any view the first "__" ends the name's stem, and what follows tells the rest
# apart: nothing, "failed" (the suffix), "failed__<version>", or a version, which is never
# "failed" nor starts with "failed__". So no two views can share a name.
NAME_RE = re.compile(
    rf"(?=[a-z0-9_]{{1,{MAX_NAME_LENGTH}}}\Z)[a-z][a-z0-9]*(?:_[a-z0-9]+)*(?:{FAILED_SUFFIX})?"
)
VERSION_RE = re.compile(rf"(?!failed(?:__|\Z))[a-z0-9_]{{1,{MAX_VERSION_LENGTH}}}")
NAME_RULE = (
    f"a dataset name has 1 to {MAX_NAME_LENGTH} characters: a lowercase letter, then "
    "lowercase letters and digits with single underscores between them (no '__', no '_' "
    f"at the end), optionally ending in {FAILED_SUFFIX!r}, the suffix failed_name() adds "
    f"(regex ^[a-z][a-z0-9]*(_[a-z0-9]+)*({FAILED_SUFFIX})?$)"
)
VERSION_RULE = (
    f"a version is 1 to {MAX_VERSION_LENGTH} lowercase letters, digits or underscores, "
    "other than 'failed' and not starting with 'failed__' (the catalog's views "
    f"'<name>{FAILED_SUFFIX}' and '<name>{FAILED_SUFFIX}__<version>' belong to the dataset "
    f"'<name>{FAILED_SUFFIX}')"
)
ROWS_PER_PART = 200_000
META_FILE = "_meta.json"
# No dataset (view) may take these names: the catalog's tables, and the lake's name (also
# its folder) and the shell's scratch database's, which a view of that name would shadow
RESERVED_NAMES = frozenset({"runs", "lineage", "models", "lake", "memory"})


class StoreError(RuntimeError):
    """Base class of the data store's errors."""


class InvalidDatasetName(ValueError):
    """A dataset name that does not follow the naming rule."""


class DatasetNotFound(StoreError):
    """The dataset or version does not exist."""


class DatasetVersionExists(StoreError):
    """The version already exists; versions are immutable."""


class CatalogBusy(StoreError):
    """Another process held the DuckDB catalog for too long."""


def data_root(root: Path | str | None = None) -> Path:
    """The data folder: ``root`` if given, else ``$FLYWHEEL_DATA_DIR``, else ``./data``."""
    if root is not None:
        return Path(root).absolute()
    env = os.environ.get("FLYWHEEL_DATA_DIR")
    return Path(env).absolute() if env else Path.cwd() / "data"


def _suggest_name(name: str, max_length: int = MAX_NAME_LENGTH) -> str:
    fixed = re.sub(r"_+", "_", re.sub(r"[^a-z0-9_]+", "_", name.lower())).strip("_")
    if not fixed:
        fixed = "dataset"
    if not fixed[0].isalpha():
        fixed = "d_" + fixed
    fixed = fixed[:max_length].rstrip("_")
    return fixed + "_data" if fixed in RESERVED_NAMES else fixed


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid dataset name, else raise InvalidDatasetName."""
    if isinstance(name, str) and NAME_RE.fullmatch(name) and name not in RESERVED_NAMES:
        return name
    text = name if isinstance(name, str) else str(name)
    size = f" ({len(text)} characters)" if len(text) > MAX_NAME_LENGTH else ""
    raise InvalidDatasetName(
        f"invalid dataset name {name!r}{size}: {NAME_RULE}, and not one of the catalog's "
        f"tables {sorted(RESERVED_NAMES)}; try {_suggest_name(text)!r}"
    )


def failed_name(name: str) -> str:
    """Name of the dataset that keeps the rows of ``name`` that failed (raw text + error)."""
    return validate_name(validate_name(name) + FAILED_SUFFIX)


def validate_output_name(
    name: str, *, field: str, suffixes: Sequence[str] = (), failed: bool = False
) -> str:
    """Check a flow's dataset-name parameter ``field`` and the names the flow derives from
    it (``name + suffix`` for each suffix, and ``failed_name(name)`` when ``failed``), so a
    name the run could only refuse at its end is refused before the run starts."""
    try:
        validate_name(name)
    except InvalidDatasetName as e:
        raise InvalidDatasetName(f"{field}: {e}") from None
    endings = [*suffixes, *([FAILED_SUFFIX] if failed else [])]
    longest = MAX_NAME_LENGTH - max((len(e) for e in endings), default=0)
    for derived in (name + ending for ending in endings):
        if NAME_RE.fullmatch(derived):
            continue
        if len(derived) > MAX_NAME_LENGTH:
            problem = (
                f"is {len(name)} characters, but the run also writes {derived!r} and a "
                f"dataset name has at most {MAX_NAME_LENGTH}, so {field} may have at most "
                f"{longest} characters"
            )
        else:
            problem = f"gives the dataset name {derived!r}, which breaks the rule: {NAME_RULE}"
        raise InvalidDatasetName(
            f"{field}: {name!r} {problem}; try {_suggest_name(name, longest)!r}"
        )
    return name


def validate_version(version: str, what: str = "dataset") -> str:
    """Return ``version`` if it is a valid version (of a dataset or model), else raise."""
    if isinstance(version, str) and VERSION_RE.fullmatch(version):
        return version
    raise ValueError(f"invalid {what} version {version!r}: {VERSION_RULE}")


def derived_error(what: str, built: str, *, field: str, value: str, limit: int, rule: str) -> str:
    """Why the `what` (a version, a model name) that a flow builds from its parameter
    ``field`` (= ``value``) is invalid: too long (and how long ``field`` may be), or
    against ``rule``."""
    if len(built) > limit:
        longest = limit - (len(built) - len(value))
        problem = (
            f"gives the {what} {built!r} of {len(built)} characters, and a {what} has at most "
            f"{limit}, so {field} may have at most {longest} characters"
        )
    else:
        problem = f"gives the {what} {built!r}, which breaks the rule: {rule}"
    return f"{field}: {value!r} {problem}"


def validate_derived_version(version: str, *, field: str, value: str) -> str:
    """Check a version that a flow builds from its parameter ``field`` (= ``value``), so a
    version the run could only refuse at its end is refused before the run starts."""
    if VERSION_RE.fullmatch(version):
        return version
    raise ValueError(
        derived_error(
            "version",
            version,
            field=field,
            value=value,
            limit=MAX_VERSION_LENGTH,
            rule=VERSION_RULE,
        )
    )


def new_version() -> str:
    """A fresh version string that sorts by creation time (UTC)."""
    now = datetime.now(UTC).strftime("%Y%m%d_%H%M%S_%f")
    return f"v{now}_{secrets.token_hex(2)}"


class DatasetRef(BaseModel):
    """One immutable version of a dataset on disk."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    path: str

    def files(self) -> list[str]:
        """Absolute paths of the parquet parts, in order."""
        return sorted(str(p) for p in Path(self.path).glob("part-*.parquet"))

    def to_arrow(self) -> pa.Table:
        """All rows as one pyarrow Table."""
        return pa.concat_tables([pq.read_table(f) for f in self.files()])

    def to_pandas(self) -> Any:
        """All rows as a pandas DataFrame."""
        return self.to_arrow().to_pandas()

    def to_hf(self, **kwargs: Any) -> Any:
        """A Hugging Face ``datasets.Dataset``; kwargs go to ``load_dataset``."""
        import datasets

        return datasets.load_dataset("parquet", data_files=self.files(), split="train", **kwargs)

    @property
    def meta(self) -> dict[str, Any]:
        """The version's ``_meta.json``."""
        return json.loads((Path(self.path) / META_FILE).read_text())

    @property
    def num_rows(self) -> int:
        """Number of rows in this version."""
        return int(self.meta["num_rows"])


def subfolders(folder: Path, keep: Callable[[Path], object]) -> list[str]:
    """Sorted names of the folders in ``folder`` for which ``keep`` is true (none if
    ``folder`` does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and keep(p))


def list_datasets(root: Path | None = None) -> list[str]:
    """Names of the datasets that have at least one version, sorted."""
    base = data_root(root)

    def is_dataset(p: Path) -> bool:
        return (
            NAME_RE.fullmatch(p.name) is not None
            and p.name not in RESERVED_NAMES
            and bool(list_versions(p.name, root=base))
        )

    return subfolders(base, is_dataset)


def list_versions(name: str, root: Path | None = None) -> list[str]:
    """Versions of a dataset, sorted (the last one is the latest)."""
    # Leftover ".tmp-*" folders from a crashed write never match VERSION_RE.
    return subfolders(data_root(root) / validate_name(name), lambda p: VERSION_RE.fullmatch(p.name))


def read_dataset(name: str, version: str | None = None, root: Path | None = None) -> DatasetRef:
    """The named version of a dataset, or its latest version."""
    base = data_root(root)
    versions = list_versions(name, root=base)
    if not versions:
        raise DatasetNotFound(
            f"no dataset {name!r} under {base}; datasets: {list_datasets(base) or 'none'}"
        )
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise DatasetNotFound(f"dataset {name!r} has no version {version!r}; versions: {versions}")
    return DatasetRef(name=name, version=version, path=str(base / name / version))


class InvalidText(ValueError):
    """Text that is not valid UTF-8: every reader of the dataset would fail on it."""


_TEXT_FIX = (
    "decode the source bytes with their real encoding (or with errors='replace'), or keep "
    "raw bytes in a binary column; nothing was written"
)


def _encodable(value: Any) -> bool:
    """Whether every string in a Python value (nested lists, tuples, dicts) encodes as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_encodable(k) and _encodable(v) for k, v in value.items())
    if hasattr(value, "tolist"):  # numpy arrays in pandas cells
        value = value.tolist()
    return not isinstance(value, (list, tuple)) or all(_encodable(v) for v in value)


def _surrogate_error(
    cells: Iterable[tuple[str, int, Any]], error: UnicodeEncodeError
) -> InvalidText:
    """pyarrow's bare UnicodeEncodeError, as an error that names the column and row."""
    where = next((f"column {c!r} row {i}" for c, i, v in cells if not _encodable(v)), "the rows")
    return InvalidText(
        f"{where}: the text holds {error.object[error.start : error.end]!r}, a lone surrogate "
        "that UTF-8 cannot encode (decoding bytes with errors='surrogateescape' leaves these); "
        f"{_TEXT_FIX}"
    )


def _to_table(rows: Any, schema: pa.Schema | None) -> pa.Table:
    if isinstance(rows, pa.Table):
        return _cast(rows, schema) if schema is not None else rows
    if type(rows).__module__.startswith("pandas"):
        try:
            return pa.Table.from_pandas(rows, schema=schema, preserve_index=False)
        except UnicodeEncodeError as e:
            cells = ((c, i, v) for c in rows.columns for i, v in enumerate(rows[c].tolist()))
            raise _surrogate_error(cells, e) from None
    rows = list(rows)
    if not rows and schema is None:
        raise ValueError("rows is empty: pass schema= so the dataset knows its columns")
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except UnicodeEncodeError as e:
        cells = ((c, i, v) for i, row in enumerate(rows) for c, v in row.items())
        raise _surrogate_error(cells, e) from None


def _cast(table: pa.Table, schema: pa.Schema) -> pa.Table:
    try:
        return table.cast(schema)
    except pa.ArrowInvalid:
        for field in schema:
            if field.name in table.column_names:
                try:
                    table.column(field.name).cast(field.type)
                except pa.ArrowInvalid as e:
                    old = table.schema.field(field.name).type
                    raise ValueError(
                        f"column {field.name!r}: cannot cast {old} to {field.type}: {e}"
                    ) from None
        raise


def _first_bad_text(chunk: pa.Array) -> tuple[int, str] | None:
    """(row, reason) of the first row of an invalid array whose text is not UTF-8."""
    if pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type):
        # bisect with arrow's own check: the rows in [lo, hi) hold the first bad one
        lo, hi = 0, len(chunk)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                chunk.slice(lo, mid - lo).validate(full=True)
                lo = mid
            except pa.ArrowInvalid:
                hi = mid
        rows: Iterable[int] = [lo] if len(chunk) else []
    else:  # nested text (lists, structs, maps): arrow checks the children as a whole
        rows = range(len(chunk))
    for row in rows:
        try:
            chunk[row].as_py()
        except UnicodeDecodeError as e:
            return row, str(e)
    return None


def invalid_text(table: pa.Table) -> Iterator[tuple[str, int, str]]:
    """(column, row, reason) of the first row of each column whose data arrow finds
    invalid: text that is not UTF-8, or (row -1, arrow's message) for anything else."""
    for name, column in zip(table.column_names, table.columns, strict=True):
        start = 0
        for chunk in column.chunks:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid as e:
                row, reason = _first_bad_text(chunk) or (-1, str(e))
                yield name, (start + row if row >= 0 else -1), reason
                break
            start += len(chunk)


def _check_text(table: pa.Table) -> None:
    """Refuse text that is not valid UTF-8, naming its column and row: parquet stores it,
    but every reader then fails with a bare UnicodeDecodeError."""
    for name, row, reason in invalid_text(table):
        if row < 0:
            raise ValueError(f"column {name!r}: invalid data ({reason}); nothing was written")
        raise InvalidText(
            f"column {name!r} row {row}: the text is not valid UTF-8 ({reason}); {_TEXT_FIX}"
        )


def _input_record(ref: Any) -> dict[str, str]:
    from flywheel.store.models import input_record

    return input_record(ref)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_version(
    target: Path, build: Callable[[Path], dict[str, Any]], *, meta_file: str, exists: StoreError
) -> None:
    """Publish the version folder ``target`` whole or not at all.

    ``build(tmp)`` fills a fresh temporary folder beside ``target`` and returns the meta
    written as ``meta_file``; the folder is then synced and renamed into place. On any
    failure the temporary folder is removed. ``exists`` is raised when another writer
    published ``target`` first.
    """
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        meta = build(tmp)
        with open(tmp / meta_file, "w") as f:
            json.dump(meta, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        try:
            os.rename(tmp, target)
        except OSError as e:
            if target.exists():
                raise exists from e
            raise
        _fsync(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


RefT = TypeVar("RefT", bound=BaseModel)


def register_published(
    register: Callable[..., None], ref: RefT, root: Path | None, what: str
) -> RefT:
    """``register(ref, root=root)`` in the catalog; if the catalog stays busy, say that the
    ``what`` (data, model) is safely on disk all the same."""
    try:
        register(ref, root=root)
    except CatalogBusy as e:
        raise CatalogBusy(
            f"{e}; the {what} itself is safely written at {ref.path} and the next "
            "refresh_catalog() registers it"
        ) from e
    return ref


def write_dataset(
    name: str,
    rows: Iterable[dict[str, Any]] | pa.Table | Any,
    *,
    produced_by: str | None = None,
    inputs: Sequence[Any] = (),
    version: str | None = None,
    root: Path | None = None,
    schema: pa.Schema | None = None,
) -> DatasetRef:
    """Write a new immutable version of a dataset and register it in the catalog.

    ``rows`` is an iterable of dicts, a pyarrow Table or a pandas DataFrame.
    """
    validate_name(name)
    version = new_version() if version is None else validate_version(version)
    base = data_root(root)
    target = base / name / version
    exists = DatasetVersionExists(f"{name} version {version} already exists at {target}")
    if target.exists():  # before converting rows that would not be written
        raise exists

    table = _to_table(rows, schema)
    if table.num_columns == 0:
        raise ValueError("rows have no columns: pass schema= so the dataset knows its columns")
    _check_text(table)

    def write_parts(tmp: Path) -> dict[str, Any]:
        offsets = range(0, max(table.num_rows, 1), ROWS_PER_PART)
        for part, offset in enumerate(offsets):
            path = tmp / f"part-{part:05d}.parquet"
            pq.write_table(table.slice(offset, ROWS_PER_PART), path)
            _fsync(path)
        return {
            "name": name,
            "version": version,
            "created": datetime.now(UTC).isoformat(),
            "produced_by": produced_by,
            # DatasetRefs or ModelRefs (models record their kind)
            "inputs": [_input_record(r) for r in inputs],
            "num_rows": table.num_rows,
            "columns": {f.name: str(f.type) for f in table.schema},
        }

    publish_version(target, write_parts, meta_file=META_FILE, exists=exists)
    # Imported here because the catalog module reads datasets through this module.
    from flywheel.store.catalog import register_version

    ref = DatasetRef(name=name, version=version, path=str(target))
    return register_published(register_version, ref, base, "data")

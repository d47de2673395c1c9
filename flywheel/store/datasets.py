"""Datasets: immutable versions, each a table of the store's lake (``<name>__<version>``,
parquet files under ``<root>/lake/files/``) with a ``versions`` row that holds its meta.

A version is written in one lake transaction (`catalog.publish_dataset`), so readers
never see half a version, and a version never changes once it exists.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
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
META_FILE = "_meta.json"
# No dataset (view) may take these names: the catalog's tables, and the lake's name (also
# its folder) and the shell's scratch database's, which a view of that name would shadow
RESERVED_NAMES = frozenset({"runs", "lineage", "models", "versions", "lake", "memory"})


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


def version_table(name: str, version: str) -> str:
    """The lake table that holds a dataset version."""
    return f"{name}__{version}"


class DatasetRef(BaseModel):
    """One immutable version of a dataset in the store at `root`."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    root: str

    @property
    def table(self) -> str:
        """The lake table that holds this version (`flywheel sql`: ``<name>__<version>``)."""
        return version_table(self.name, self.version)

    def files(self) -> list[str]:
        """Absolute paths of the version's parquet files, in row order (none when it has
        no rows), e.g. for ``datasets.load_dataset("parquet", data_files=...)``."""
        from flywheel.store.catalog import version_files

        return version_files(self.name, self.version, Path(self.root))

    def to_arrow(self) -> pa.Table:
        """All rows as one pyarrow Table."""
        from flywheel.store.catalog import version_rows

        return version_rows(self.name, self.version, Path(self.root))

    def to_pandas(self) -> Any:
        """All rows as a pandas DataFrame."""
        return self.to_arrow().to_pandas()

    def to_hf(self, **kwargs: Any) -> Any:
        """A Hugging Face ``datasets.Dataset``; kwargs go to ``load_dataset``. From its
        local parquet files; from memory when the lake's files are in S3 (loading those
        needs ``s3fs`` and its ``storage_options``) or the version has no rows."""
        import datasets

        files = self.files()
        if files and not files[0].startswith("s3://"):
            return datasets.load_dataset("parquet", data_files=files, split="train", **kwargs)
        if kwargs:
            raise ValueError(
                f"{self.name}@{self.version}: load_dataset arguments {sorted(kwargs)} apply to "
                "local parquet files only; this version is read into memory (no files, or "
                "files in S3): call to_hf() without them"
            )
        return datasets.Dataset(datasets.table.InMemoryTable(self.to_arrow()))

    @property
    def meta(self) -> dict[str, Any]:
        """name, version, created, produced_by, inputs, num_rows, columns."""
        from flywheel.store.catalog import version_meta

        return version_meta(self.name, self.version, Path(self.root))

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
    from flywheel.store.catalog import dataset_versions

    return sorted(dataset_versions(data_root(root)))


def list_versions(name: str, root: Path | None = None) -> list[str]:
    """Versions of a dataset, sorted (the last one is the latest)."""
    from flywheel.store.catalog import dataset_versions

    return dataset_versions(data_root(root), validate_name(name)).get(name, [])


def old_version_folders(root: Path | None = None, name: str | None = None) -> list[Path]:
    """Version folders of the store's layout before the lake
    (``<root>/<name>/<version>/_meta.json``), which `flywheel store migrate` moves in;
    of the dataset `name` only, if given."""
    base = data_root(root)
    names = [name] if name is not None else subfolders(base, lambda p: NAME_RE.fullmatch(p.name))
    return [
        base / dataset / version
        for dataset in names
        for version in subfolders(
            base / dataset, lambda p: VERSION_RE.fullmatch(p.name) and (p / META_FILE).is_file()
        )
    ]


def read_dataset(name: str, version: str | None = None, root: Path | None = None) -> DatasetRef:
    """The named version of a dataset, or its latest version."""
    base = data_root(root)
    versions = list_versions(name, root=base)
    if not versions:
        hint = ""
        if old_version_folders(base, name):
            hint = (
                f"; {base / name} holds versions in the store's layout before the lake: "
                "run `flywheel store migrate` to move them in"
            )
        raise DatasetNotFound(
            f"no dataset {name!r} under {base}; datasets: {list_datasets(base) or 'none'}{hint}"
        )
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise DatasetNotFound(f"dataset {name!r} has no version {version!r}; versions: {versions}")
    return DatasetRef(name=name, version=version, root=str(base))


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
    exists = DatasetVersionExists(f"{name} version {version} already exists in {base}")
    if version in list_versions(name, root=base):  # before converting rows never written
        raise exists

    table = _to_table(rows, schema)
    if table.num_columns == 0:
        raise ValueError("rows have no columns: pass schema= so the dataset knows its columns")
    _check_text(table)
    meta = {
        "name": name,
        "version": version,
        "created": datetime.now(UTC).isoformat(),
        "produced_by": produced_by,
        # DatasetRefs or ModelRefs (models record their kind)
        "inputs": [_input_record(r) for r in inputs],
        "num_rows": table.num_rows,
        "columns": {f.name: str(f.type) for f in table.schema},
    }
    # Imported here because the catalog module reads datasets through this module.
    from flywheel.store.catalog import publish_dataset

    publish_dataset(table, meta, exists, base)
    return DatasetRef(name=name, version=version, root=str(base))

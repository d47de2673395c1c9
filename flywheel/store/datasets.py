"""Datasets: immutable versions, each a table of the store's lake (``<name>__<version>``,
parquet files under ``<root>/lake/files/``) with a ``versions`` row that holds its meta.

A version is written in one lake transaction (`publish.write_dataset`), so readers
never see half a version, and a version never changes once it exists. This module reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from flywheel.store.catalog import dataset_versions, version_files, version_meta, version_rows
from flywheel.store.naming import (
    META_FILE,
    NAME_RE,
    VERSION_RE,
    DatasetNotFound,
    data_root,
    subfolders,
    validate_name,
    version_table,
)


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
        return version_files(self.name, self.version, Path(self.root))

    def to_arrow(self) -> pa.Table:
        """All rows as one pyarrow Table."""
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
        return version_meta(self.name, self.version, Path(self.root))

    @property
    def num_rows(self) -> int:
        """Number of rows in this version."""
        return int(self.meta["num_rows"])


def list_datasets(root: Path | None = None) -> list[str]:
    """Names of the datasets that have at least one version, sorted."""
    return sorted(dataset_versions(data_root(root)))


def list_versions(name: str, root: Path | None = None) -> list[str]:
    """Versions of a dataset, sorted (the last one is the latest)."""
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


def to_table(rows: Any, schema: pa.Schema | None) -> pa.Table:
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


def check_text(table: pa.Table) -> None:
    """Refuse text that is not valid UTF-8, naming its column and row: parquet stores it,
    but every reader then fails with a bare UnicodeDecodeError."""
    for name, row, reason in invalid_text(table):
        if row < 0:
            raise ValueError(f"column {name!r}: invalid data ({reason}); nothing was written")
        raise InvalidText(
            f"column {name!r} row {row}: the text is not valid UTF-8 ({reason}); {_TEXT_FIX}"
        )

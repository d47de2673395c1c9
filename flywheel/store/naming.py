"""What every module of the store builds on: where the data folder is, the rules for
dataset names and versions (and the view names they give), and the store's errors."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

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


def subfolders(folder: Path, keep: Callable[[Path], object]) -> list[str]:
    """Sorted names of the folders in ``folder`` for which ``keep`` is true (none if
    ``folder`` does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and keep(p))

"""The data store: dataset versions as tables of a DuckLake with their catalog (runs,
models, lineage), and trained models in version folders.

Its modules in the order they build on each other: `naming` (names, versions, errors,
the data folder), `lake` (the DuckLake connection), `catalog` (its tables, reads and
read-only `sql`), `datasets` and `models` (references and reads), `publish` (everything
that writes), then `importing`, `migrate` and `checkpoint`."""

from flywheel.store.catalog import sql
from flywheel.store.checkpoint import Checkpoint
from flywheel.store.datasets import DatasetRef, list_datasets, list_versions, read_dataset
from flywheel.store.importing import ImportRefused, ImportReport, import_file
from flywheel.store.models import (
    FileRef,
    ModelNotRegistered,
    ModelRef,
    list_model_versions,
    list_models,
    models_dir,
    read_model,
)
from flywheel.store.naming import (
    CatalogBusy,
    DatasetNotFound,
    DatasetVersionExists,
    InvalidDatasetName,
    StoreError,
    data_root,
    failed_name,
    validate_name,
)
from flywheel.store.publish import record_run, refresh_catalog, save_model_version, write_dataset

__all__ = [
    "Checkpoint",
    "CatalogBusy",
    "DatasetNotFound",
    "DatasetRef",
    "DatasetVersionExists",
    "FileRef",
    "ImportRefused",
    "ImportReport",
    "InvalidDatasetName",
    "ModelNotRegistered",
    "ModelRef",
    "StoreError",
    "data_root",
    "failed_name",
    "import_file",
    "list_datasets",
    "list_model_versions",
    "list_models",
    "models_dir",
    "list_versions",
    "read_dataset",
    "read_model",
    "record_run",
    "refresh_catalog",
    "save_model_version",
    "sql",
    "validate_name",
    "write_dataset",
]

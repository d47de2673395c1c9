"""The data store: dataset versions as tables of a DuckLake with their catalog (runs,
models, lineage), and trained models in version folders."""

from flywheel.store.catalog import record_run, refresh_catalog, sql
from flywheel.store.checkpoint import Checkpoint
from flywheel.store.datasets import (
    CatalogBusy,
    DatasetNotFound,
    DatasetRef,
    DatasetVersionExists,
    InvalidDatasetName,
    StoreError,
    data_root,
    failed_name,
    list_datasets,
    list_versions,
    read_dataset,
    validate_name,
    write_dataset,
)
from flywheel.store.importing import ImportRefused, ImportReport, import_file
from flywheel.store.models import (
    FileRef,
    ModelNotRegistered,
    ModelRef,
    list_model_versions,
    list_models,
    models_dir,
    read_model,
    save_model_version,
)

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

"""Datasets on disk (versioned parquet folders) and the DuckDB catalog that views them."""

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

__all__ = [
    "Checkpoint",
    "CatalogBusy",
    "DatasetNotFound",
    "DatasetRef",
    "DatasetVersionExists",
    "InvalidDatasetName",
    "StoreError",
    "data_root",
    "failed_name",
    "list_datasets",
    "list_versions",
    "read_dataset",
    "record_run",
    "refresh_catalog",
    "sql",
    "validate_name",
    "write_dataset",
]

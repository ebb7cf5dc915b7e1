"""MEDS datasets: reading (`read`) and validation (`validate`, each data file checked by
`shard_checks`); every pipeline step uses these."""

from ehrmotor.meds.read import (
    DATA_COLUMNS,
    DATA_DTYPES,
    Finding,
    MedsError,
    data_files,
    read_codes_metadata,
    read_dataset_metadata,
    read_subject_splits,
    scan_shard,
)
from ehrmotor.meds.validate import ValidationReport, require_valid, validate_dataset

__all__ = [
    "DATA_COLUMNS",
    "DATA_DTYPES",
    "Finding",
    "MedsError",
    "ValidationReport",
    "data_files",
    "read_codes_metadata",
    "read_dataset_metadata",
    "read_subject_splits",
    "require_valid",
    "scan_shard",
    "validate_dataset",
]

"""MEDS datasets: reading (`read`) and validation (`validate`, each data file checked by
`shard_checks`); every pipeline step uses these. MEDS label files: `labels`."""

from ehrmotor.meds.label_paths import label_tasks
from ehrmotor.meds.labels import (
    LABEL_KINDS,
    VALUE_COLUMNS,
    LabelSet,
    check_label_set,
    read_label_set,
    read_label_sets,
    read_prediction_times,
    time_to_event_days,
    write_label_set,
)
from ehrmotor.meds.read import (
    DATA_COLUMNS,
    DATA_DTYPES,
    Finding,
    MedsError,
    data_files,
    read_codes_metadata,
    read_dataset_metadata,
    read_splits_file,
    read_subject_splits,
    scan_shard,
)
from ehrmotor.meds.validate import ValidationReport, require_valid, validate_dataset

__all__ = [
    "DATA_COLUMNS",
    "DATA_DTYPES",
    "LABEL_KINDS",
    "VALUE_COLUMNS",
    "Finding",
    "LabelSet",
    "check_label_set",
    "MedsError",
    "ValidationReport",
    "data_files",
    "read_codes_metadata",
    "read_dataset_metadata",
    "label_tasks",
    "read_label_set",
    "read_label_sets",
    "read_prediction_times",
    "read_splits_file",
    "read_subject_splits",
    "require_valid",
    "scan_shard",
    "time_to_event_days",
    "validate_dataset",
    "write_label_set",
]

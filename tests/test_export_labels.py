"""Labels from any MEDS export (issue 17): landmarks from configurable codes (default: every day
with an event), any code as an outcome, no empty label file, a folder of several label files as
several tasks, and one set of label checks for `embed` and `evaluate`."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from export_builders import FIRST_SUBJECT, split_of, write_mimic_like

from ehrmotor.cli import main
from ehrmotor.errors import InputError
from ehrmotor.evaluate import LandmarkSettings, landmark_label_sets
from ehrmotor.evaluate.run import RESULT_SCHEMA
from ehrmotor.evaluate.tasks import evaluation_subjects, outcome_matcher, tasks_from_label_sets
from ehrmotor.meds import LabelSet, read_label_set, read_label_sets
from ehrmotor.synthetic.outcomes import outcome_codes

T0 = datetime(2020, 1, 1)
LATER, EARLIER = T0 + timedelta(days=3), T0 - timedelta(days=3)


@pytest.fixture(scope="module")
def mimic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mimic_like(tmp_path_factory.mktemp("export") / "meds")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """(exit status, last stderr line) of `ehrmotor ARGV`."""
    capsys.readouterr()
    status = main(list(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    return status, lines[-1] if lines else ""


def events(meds: Path) -> pl.DataFrame:
    return pl.read_parquet(meds / "data" / "*.parquet")


# --------------------------------------------------------------------------- landmarks


def test_label_on_an_export_without_visit_codes_writes_labels_by_default(
        mimic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert not events(mimic)["code"].str.starts_with("Visit/").any()
    out = tmp_path / "labels"
    assert run(capsys, "label", "--meds", str(mimic), "--out", str(out),
               "--outcomes", "death")[0] == 0
    death = read_label_set(out / "death.parquet").frame
    assert death.height > 20 and death["event_time"].count() > 0
    evaluated = [FIRST_SUBJECT + i for i in range(120) if split_of(i) != "train"]
    assert set(death["subject_id"]) <= set(evaluated)
    # each prediction time is the last event of its day: no later event that day is seen
    data = events(mimic).drop_nulls("time")
    keyed = death.join(data, on="subject_id").filter(
        (pl.col("time").dt.date() == pl.col("prediction_time").dt.date())
        & (pl.col("time") > pl.col("prediction_time")))
    assert keyed.is_empty()
    assert death.join(data.rename({"time": "prediction_time"}),
                      on=["subject_id", "prediction_time"], how="anti").is_empty()


def test_label_at_admissions_with_landmark_codes(
        mimic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "labels"
    assert run(capsys, "label", "--meds", str(mimic), "--out", str(out), "--outcomes",
               "MEDS_DEATH", "--landmark-codes", "HOSPITAL_ADMISSION//")[0] == 0
    death = read_label_set(out / "MEDS_DEATH.parquet").frame
    assert death.height > 20
    admissions = events(mimic).filter(pl.col("code").str.starts_with("HOSPITAL_ADMISSION//"))
    at_admission = death.join(admissions.select("subject_id", prediction_time="time"),
                              on=["subject_id", "prediction_time"], how="semi")
    assert at_admission.height == death.height
    record = (out / "labels.json").read_text()
    assert '"landmark_codes": [\n    "HOSPITAL_ADMISSION//"' in record


def test_any_code_is_an_outcome_prefix_or_exact() -> None:
    codes = outcome_codes(["MEDS_DEATH", "ICU_ADMISSION", "HOSPITAL_ADMISSION//URGENT", "death"])
    assert codes == {"MEDS_DEATH": ["MEDS_DEATH"], "ICU_ADMISSION": ["ICU_ADMISSION"],
                     "HOSPITAL_ADMISSION//URGENT": ["HOSPITAL_ADMISSION//URGENT"],
                     "death": ["MEDS_DEATH"]}
    frame = pl.DataFrame({"code": ["MEDS_DEATH", "ICU_ADMISSION//MICU", "ICU_ADMISSIONS",
                                   "HOSPITAL_ADMISSION//URGENT", "ICD10CM/I50.9", "ICD10CM/I509"]})

    def matched(*given: str) -> list[str]:
        return frame.filter(outcome_matcher(given))["code"].to_list()

    assert matched("MEDS_DEATH") == ["MEDS_DEATH"]
    assert matched("ICU_ADMISSION") == ["ICU_ADMISSION//MICU"]
    assert matched("HOSPITAL_ADMISSION//") == ["HOSPITAL_ADMISSION//URGENT"]
    assert matched("ICD10CM/I50") == ["ICD10CM/I50.9"]


def test_code_outcomes_label_a_mimic_like_export(mimic: Path) -> None:
    outcomes = {"death": ["MEDS_DEATH"], "icu": ["ICU_ADMISSION"]}
    death, icu = landmark_label_sets(mimic, outcomes, LandmarkSettings(landmarks=2))
    assert (death.name, icu.name) == ("death", "icu")
    assert death.frame["event_time"].count() > 0 and icu.frame["event_time"].count() > 0


NO_LABELS = {
    "landmark codes absent": (["--outcomes", "death", "--landmark-codes", "Visit/,Visit_"],
                              ["no event with a code starting with Visit/, Visit_ among the 24 "
                               "evaluation subjects", "HOSPITAL_ADMISSION//", "MEDS_BIRTH"]),
    "every landmark prevalent": (["--outcomes", "MEDS_BIRTH"],
                                 ["outcome MEDS_BIRTH: every one of the", "already had"]),
    "outcome code absent": (["--outcomes", "death,DIAGNOSIS//ICD//10//Z99"],
                            ["outcome DIAGNOSIS//ICD//10//Z99: no event with code",
                             "DIAGNOSIS//"]),
    "no landmark before the last event": (["--outcomes", "death", "--landmark-codes",
                                           "MEDS_BIRTH"],
                                          ["none of the", "landmark days (MEDS_BIRTH)"]),
}


@pytest.mark.parametrize("case", list(NO_LABELS))
def test_no_label_for_an_outcome_is_exit_2_naming_why(
        mimic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    options, expected = NO_LABELS[case]
    out = tmp_path / "labels"
    status, error = run(capsys, "label", "--meds", str(mimic), "--out", str(out), *options)
    assert status == 2 and error.startswith("ehrmotor label: error: ")
    for part in expected:
        assert part in error
    assert not out.exists()


# --------------------------------------------------------------------------- label folders


@pytest.fixture(scope="module")
def two_outcomes(mimic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two") / "labels"
    assert main(["label", "--meds", str(mimic), "--out", str(out), "--outcomes",
                 "death,ICU_ADMISSION"]) == 0
    return out


def test_a_folder_of_two_outcome_files_is_two_tasks_never_merged(
        mimic: Path, two_outcomes: Path) -> None:
    label_sets = read_label_sets(two_outcomes)
    assert [ls.name for ls in label_sets] == ["ICU_ADMISSION", "death"]
    for label_set in label_sets:
        alone = read_label_set(two_outcomes / f"{label_set.name}.parquet")
        assert label_set.frame.equals(alone.frame) and label_set.files == alone.files
    icu, death = tasks_from_label_sets(mimic, label_sets, evaluation_subjects(mimic),
                                       from_outcomes=False)
    assert (icu.name, death.name) == ("ICU_ADMISSION", "death")
    assert (icu.labels.height, death.labels.height) == tuple(
        ls.frame.height for ls in label_sets)
    assert icu.labels["event"].sum() != death.labels["event"].sum()


def test_a_folder_of_shards_stays_one_task(tmp_path: Path) -> None:
    for split, subject in (("train", 1), ("held_out", 2)):
        folder = tmp_path / "readmission" / split
        folder.mkdir(parents=True)
        pl.DataFrame({"subject_id": [subject], "prediction_time": [T0],
                      "boolean_value": [True]}).write_parquet(folder / "0.parquet")
    (task,) = read_label_sets(tmp_path / "readmission")
    assert task.name == "readmission" and task.frame["subject_id"].to_list() == [1, 2]


def test_one_task_readers_refuse_a_folder_of_several(
        two_outcomes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputError, match=r"holds 2 tasks \(ICU_ADMISSION, death\), one per "):
        read_label_set(two_outcomes)
    status, error = run(capsys, "embed", "--model", str(tmp_path / "no_model"), "--meds",
                        str(tmp_path / "meds"), "--labels", str(two_outcomes), "--out",
                        str(tmp_path / "embeddings.parquet"))
    assert status == 2
    assert error.startswith(f"ehrmotor embed: error: labels folder {two_outcomes}: holds 2 "
                            "tasks (ICU_ADMISSION, death)")
    assert f"give one task's file, e.g. {two_outcomes / 'ICU_ADMISSION.parquet'}" in error
    status, error = run(capsys, "evaluate", "--model", str(tmp_path / "no_model"), "--meds",
                        str(tmp_path / "meds"), "--out", str(tmp_path / "evaluation"), "--labels",
                        str(two_outcomes), "--task-name", "x")
    assert status == 2 and "holds 2 tasks" in error


def test_evaluate_runs_each_task_of_a_label_folder(
        tiny_bundle: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    meds, bundle = tiny_bundle
    labels = tmp_path / "labels"
    assert run(capsys, "label", "--meds", str(meds), "--out", str(labels), "--subjects",
               "held_out", "--outcomes", "hypertension,ICD10CM/J44")[0] == 0
    out = tmp_path / "evaluation"
    assert run(capsys, "evaluate", "--model", str(bundle), "--meds", str(meds), "--out",
               str(out), "--subjects", "held_out", "--labels", str(labels), "--k", "all",
               "--replicates", "1", "--bootstrap", "5", "--max-count-features", "50")[0] == 0
    results = pl.read_csv(out / "results.csv", schema=RESULT_SCHEMA)
    assert results["task"].unique(maintain_order=True).to_list() == ["ICD10CM_J44",
                                                                      "hypertension"]
    heights = {ls.name: ls.frame["subject_id"].n_unique() for ls in read_label_sets(labels)}
    subjects = results.group_by("task").agg(pl.col("test_subjects").max())
    assert all(n <= heights[task] for task, n in subjects.iter_rows())


# --------------------------------------------------------------------------- label checks

KEYS = {"subject_id": [1, 2], "prediction_time": [T0, T0]}
BAD_LABELS = {
    "event before prediction": ({**KEYS, "event_time": [LATER, EARLIER],
                                 "censor_time": [None, None]},
                                "column 'event_time', row 1 (subject 2): event_time "),
    "censor before prediction": ({**KEYS, "event_time": [None, None],
                                  "censor_time": [LATER, EARLIER]},
                                 "column 'censor_time', row 1 (subject 2): censor_time "),
    "both null": ({**KEYS, "event_time": [LATER, None], "censor_time": [None, None]},
                  "column 'event_time', row 1 (subject 2): neither event_time nor censor_time"),
    "two value columns": ({**KEYS, "event_time": [LATER, None], "censor_time": [None, LATER],
                           "boolean_value": [None, True]},
                          "column 'boolean_value', row 1 (subject 2): boolean_value holds a "
                          "label beside event_time and censor_time"),
    "two MEDS value columns": ({**KEYS, "boolean_value": [True, None],
                                "float_value": [None, 1.0]},
                               "columns boolean_value, float_value all hold labels"),
    "duplicate": ({"subject_id": [1, 2, 1], "prediction_time": [T0, T0, T0],
                   "boolean_value": [True, False, False]},
                  "column 'prediction_time', row 2 (subject 1): prediction_time 2020-01-01 "
                  "00:00:00 repeats row 0 for this subject; expected one label per subject"),
    "duplicate without labels": ({"subject_id": [1, 1], "prediction_time": [T0, T0]},
                                 "column 'prediction_time', row 1 (subject 1)"),
}


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_embed_refuses_bad_label_rows_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    columns, expected = BAD_LABELS[case]
    path = tmp_path / "task.parquet"
    pl.DataFrame(columns).write_parquet(path)
    status, error = run(capsys, "embed", "--model", str(tmp_path / "no_model"), "--meds",
                        str(tmp_path / "meds"), "--labels", str(path), "--out",
                        str(tmp_path / "embeddings.parquet"))
    assert status == 2
    assert error.startswith(f"ehrmotor embed: error: {path}: ")
    assert expected in error
    if "labels" not in case:  # evaluate reads label files with the same checks
        with pytest.raises(InputError, match="^" + str(path)):
            read_label_sets(path)


def test_a_repeat_in_another_shard_names_both_files(tmp_path: Path) -> None:
    for shard in (0, 1):
        pl.DataFrame({"subject_id": [7], "prediction_time": [T0], "boolean_value": [True]}
                     ).write_parquet(tmp_path / f"{shard}.parquet")
    with pytest.raises(InputError) as caught:
        read_label_sets(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / '1.parquet'}: column 'prediction_time', "
                                        f"row 0 (subject 7): prediction_time 2020-01-01 "
                                        f"00:00:00 repeats row 0 of {tmp_path / '0.parquet'}")


def test_evaluate_tasks_refuse_repeated_labels_built_in_memory(mimic: Path) -> None:
    subject = FIRST_SUBJECT  # held_out
    frame = pl.DataFrame({"subject_id": [subject, subject],
                          "prediction_time": [datetime(2019, 1, 1)] * 2,
                          "boolean_value": [True, False]},
                         schema_overrides={"prediction_time": pl.Datetime("us")})
    with pytest.raises(InputError, match=r"labels mortality: column 'prediction_time', row 1 "):
        tasks_from_label_sets(mimic, [LabelSet("mortality", "boolean", frame)],
                              evaluation_subjects(mimic), from_outcomes=False)

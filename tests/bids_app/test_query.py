"""Tests of bids_app.query: dataset checks, labels, filters and sequence assignment traps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from layouts import make_bids, snapshot

from bids_app.errors import InputError, MissingInputError, NothingSelectedError, UsageError
from bids_app.query import (
    SEQUENCES,
    AnatImage,
    SessionInputs,
    check_dataset,
    collect_sessions,
    load_filters,
    load_layout,
    load_queries,
    normalize_labels,
)


def collect(root: Path, spec: dict, **kwargs) -> dict[str, SessionInputs]:
    """Build ``spec`` under ``root``, index it, and return the units by label."""
    make_bids(root, spec)
    units = collect_sessions(load_layout(root), **kwargs)
    return {unit.label: unit for unit in units}


def names(unit: SessionInputs, sequence: str) -> list[str]:
    return [image.filename for image in unit.candidates[sequence]]


def ignored_names(unit: SessionInputs) -> dict[str, str]:
    return {Path(path).name: reason for path, reason in unit.ignored}


def all_candidate_names(unit: SessionInputs) -> set[str]:
    return {image.filename for images in unit.candidates.values() for image in images}


# --------------------------------------------------------------------------- check_dataset
def test_check_dataset_accepts_valid(tmp_path):
    check_dataset(make_bids(tmp_path / "ds", {}))


def test_check_dataset_missing_dir(tmp_path):
    with pytest.raises(MissingInputError, match="not found"):
        check_dataset(tmp_path / "nope")


def test_check_dataset_missing_description(tmp_path):
    root = make_bids(tmp_path / "ds", {"sub-01/anat/sub-01_T1w.nii.gz": None}, dataset_description=None)
    with pytest.raises(MissingInputError, match="dataset_description.json"):
        check_dataset(root)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"Name": "x", ', "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({"Name": "x"}, "BIDSVersion"),
        ({"BIDSVersion": "1.9.0"}, "Name"),
    ],
)
def test_check_dataset_invalid_description(tmp_path, content, match):
    root = make_bids(tmp_path / "ds", {}, dataset_description=content)
    with pytest.raises(InputError, match=match) as info:
        check_dataset(root)
    assert info.value.path == root / "dataset_description.json"
    assert "dataset_description.json" in str(info.value)


def test_load_layout_checks_dataset(tmp_path):
    root = make_bids(tmp_path / "ds", {}, dataset_description='{"oops"')
    with pytest.raises(InputError, match="dataset_description.json"):
        load_layout(root)


# --------------------------------------------------------------------------- labels
@pytest.mark.parametrize(
    ("labels", "prefix", "expected"),
    [
        (None, "sub", None),
        (["sub-01", "02"], "sub", ["01", "02"]),
        (["01", "sub-01", "sub-02"], "sub-", ["01", "02"]),
        (["ses-pre", "post"], "ses", ["pre", "post"]),
        ("sub-01", "sub", ["01"]),
        (["subject1"], "sub", ["subject1"]),
    ],
)
def test_normalize_labels(labels, prefix, expected):
    assert normalize_labels(labels, prefix) == expected


@pytest.mark.parametrize("bad", ["../x", "01/..", "", "sub-", "sub-01_ses-1", "a b", "sub-sub-01", "01+"])
def test_normalize_labels_rejects(bad):
    with pytest.raises(UsageError, match="invalid sub- label"):
        normalize_labels([bad], "sub")


def test_normalize_labels_rejects_empty_list():
    with pytest.raises(UsageError):
        normalize_labels([], "ses")


# --------------------------------------------------------------------------- filters
def write_filter(tmp_path: Path, content) -> Path:
    path = tmp_path / "filters.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_load_filters_none():
    assert load_filters(None) == {}


def test_load_filters_valid_and_short_keys(tmp_path):
    path = write_filter(tmp_path, {"T2w": {"acq": "highres", "run": 2}, "swi": {"ce": None, "rec": "*"}})
    assert load_filters(path) == {
        "t2w": {"acquisition": "highres", "run": 2},
        "swi": {"ceagent": None, "reconstruction": "*"},
    }


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"t2w": {"acquisition": ', "not valid JSON"),
        ({"bold": {"task": "rest"}}, "unknown key 'bold'"),
        ({"t2w": "highres"}, "must be an object"),
        ({"t2w": ["acq-highres"]}, "must be an object"),
        ({"t1w": {"acquisiton": "x"}}, "unknown BIDS entity 'acquisiton'"),
        ({"t1w": {"subject": "01"}}, "--participant-label"),
        ({"t1w": {"acquisition": {"a": 1}}}, "must be a string"),
        ("[]", "JSON object"),
    ],
)
def test_load_filters_rejects(tmp_path, content, match):
    path = write_filter(tmp_path, content)
    with pytest.raises(UsageError, match=match) as info:
        load_filters(path)
    assert info.value.path == path
    assert "filters.json" in str(info.value)


def test_load_filters_missing_file(tmp_path):
    with pytest.raises(UsageError, match="cannot read") as info:
        load_filters(tmp_path / "absent.json")
    assert "absent.json" in str(info.value)


def test_filter_narrows_and_reports_exclusion(tmp_path):
    path = write_filter(tmp_path, {"t2w": {"acquisition": "highres"}, "t1w": {"ceagent": None}})
    units = collect(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_acq-highres_T2w.nii.gz": None,
            "sub-01/anat/sub-01_acq-fast_T2w.nii.gz": None,
            "sub-01/anat/sub-01_T1w.nii.gz": None,
            "sub-01/anat/sub-01_ce-gadolinium_T1w.nii.gz": None,
        },
        bids_filters=load_filters(path),
    )
    unit = units["sub-01"]
    assert names(unit, "T2w") == ["sub-01_acq-highres_T2w.nii.gz"]
    assert names(unit, "T1w") == ["sub-01_T1w.nii.gz"]
    reasons = ignored_names(unit)
    assert "excluded by the BIDS filter for 't2w'" in reasons["sub-01_acq-fast_T2w.nii.gz"]
    assert "'t1w'" in reasons["sub-01_ce-gadolinium_T1w.nii.gz"]


def test_filter_can_retarget_suffix_but_never_phase(tmp_path):
    units = collect(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_UNIT1.nii.gz": None,
            "sub-01/anat/sub-01_part-phase_T2starw.nii.gz": None,
        },
        bids_filters={"t1w": {"suffix": "UNIT1"}, "swi": {"part": "phase"}},
    )
    unit = units["sub-01"]
    assert names(unit, "T1w") == ["sub-01_UNIT1.nii.gz"]
    assert unit.candidates["SWI"] == ()
    assert "part-phase" in ignored_names(unit)["sub-01_part-phase_T2starw.nii.gz"]


def test_collect_rejects_bad_filter_dict(tmp_path):
    make_bids(tmp_path / "ds", {"sub-01/anat/sub-01_T1w.nii.gz": None})
    with pytest.raises(UsageError, match="unknown key"):
        collect_sessions(load_layout(tmp_path / "ds"), bids_filters={"dwi": {}})


# --------------------------------------------------------------------------- sequence traps
def test_inplane_t2_is_ignored(tmp_path):
    unit = collect(
        tmp_path / "ds",
        {"sub-01/anat/sub-01_inplaneT2.nii.gz": None, "sub-01/anat/sub-01_inplaneT1.nii": None},
    )["sub-01"]
    assert all_candidate_names(unit) == set()
    reasons = ignored_names(unit)
    assert "in-plane" in reasons["sub-01_inplaneT2.nii.gz"]
    assert "in-plane" in reasons["sub-01_inplaneT1.nii"]


def test_t2starw_is_swi_not_t2w(tmp_path):
    unit = collect(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_T2w.nii.gz": None,
            "sub-01/anat/sub-01_T2starw.nii.gz": None,
            "sub-01/anat/sub-01_T2starmap.nii.gz": None,
            "sub-01/anat/sub-01_T2star.nii.gz": None,
        },
    )["sub-01"]
    assert names(unit, "T2w") == ["sub-01_T2w.nii.gz"]
    assert names(unit, "SWI") == ["sub-01_T2starw.nii.gz"]
    reasons = ignored_names(unit)
    assert "quantitative" in reasons["sub-01_T2starmap.nii.gz"]
    assert "deprecated" in reasons["sub-01_T2star.nii.gz"]


def test_suffix_not_substring(tmp_path):
    unit = collect(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_acq-T1wlike_T2w.nii.gz": None,
            "sub-01/anat/sub-01_acq-FLAIRish_T1w.nii.gz": None,
            "sub-01/anat/sub-01_acq-swi_T2w.nii.gz": None,
            "sub-01/anat/sub-01_mod-T1w_defacemask.nii.gz": None,
            "sub-01/anat/sub-01_PDT2.nii.gz": None,
        },
    )["sub-01"]
    assert names(unit, "T2w") == ["sub-01_acq-T1wlike_T2w.nii.gz", "sub-01_acq-swi_T2w.nii.gz"]
    assert names(unit, "T1w") == ["sub-01_acq-FLAIRish_T1w.nii.gz"]
    assert names(unit, "FLAIR") == []
    assert names(unit, "SWI") == []
    assert set(ignored_names(unit)) == {"sub-01_mod-T1w_defacemask.nii.gz", "sub-01_PDT2.nii.gz"}


def test_swi_by_acquisition_label(tmp_path):
    unit = collect(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_acq-SWI_T2starw.nii.gz": None,
            "sub-01/anat/sub-01_acq-swiMag_GRE.nii.gz": None,
            "sub-01/anat/sub-01_acq-SwI_T2star.nii": None,
            "sub-01/anat/sub-01_acq-mySWI_GRE.nii.gz": None,
            "sub-01/anat/sub-01_GRE.nii.gz": None,
            "sub-01/anat/sub-01_acq-swiMinIP_angio.nii.gz": None,
            "sub-01/anat/sub-01_rec-scanner_swi.nii.gz": None,
        },
    )["sub-01"]
    assert names(unit, "SWI") == [
        "sub-01_acq-SWI_T2starw.nii.gz",
        "sub-01_acq-SwI_T2star.nii",
        "sub-01_acq-swiMag_GRE.nii.gz",
        "sub-01_rec-scanner_swi.nii.gz",
    ]
    reasons = ignored_names(unit)
    assert "acq label" in reasons["sub-01_GRE.nii.gz"]
    assert "acq label" in reasons["sub-01_acq-mySWI_GRE.nii.gz"]
    assert "angiography" in reasons["sub-01_acq-swiMinIP_angio.nii.gz"]


def test_megre_phase_never_used(tmp_path):
    spec = {}
    for echo in (1, 2, 3):
        for part in ("mag", "phase"):
            spec[f"sub-01/anat/sub-01_echo-{echo}_part-{part}_MEGRE.nii.gz"] = None
            spec[f"sub-01/anat/sub-01_echo-{echo}_part-{part}_MEGRE.json"] = {"EchoTime": 0.005 * echo}
    spec["sub-01/anat/sub-01_part-real_T2starw.nii.gz"] = None
    spec["sub-01/anat/sub-01_part-imag_T2starw.nii.gz"] = None
    spec["sub-01/anat/sub-01_echo-1_MEGRE.nii.gz"] = None  # no part entity: magnitude by convention
    unit = collect(tmp_path / "ds", spec)["sub-01"]
    assert names(unit, "SWI") == [
        "sub-01_echo-1_MEGRE.nii.gz",
        "sub-01_echo-1_part-mag_MEGRE.nii.gz",
        "sub-01_echo-2_part-mag_MEGRE.nii.gz",
        "sub-01_echo-3_part-mag_MEGRE.nii.gz",
    ]
    assert not any("phase" in name for name in all_candidate_names(unit))
    reasons = ignored_names(unit)
    assert len(reasons) == 5
    assert all("never used" in reason for reason in reasons.values())
    echo3 = unit.candidates["SWI"][-1]
    assert echo3.entities["echo"] == "3" and echo3.entities["part"] == "mag"
    assert echo3.metadata["EchoTime"] == pytest.approx(0.015)


def test_nii_and_niigz_mixed_and_other_datatypes(tmp_path):
    unit = collect(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_T1w.nii": None,
            "sub-01/anat/sub-01_FLAIR.nii.gz": None,
            "sub-01/anat/sub-01_T2w.mgz": "not nifti",
            "sub-01/func/sub-01_task-rest_bold.nii.gz": None,
            "sub-01/dwi/sub-01_dwi.nii.gz": None,
        },
    )["sub-01"]
    assert names(unit, "T1w") == ["sub-01_T1w.nii"]
    assert names(unit, "FLAIR") == ["sub-01_FLAIR.nii.gz"]
    assert unit.candidates["T1w"][0].entities["extension"] == ".nii"
    assert unit.candidates["FLAIR"][0].entities["extension"] == ".nii.gz"
    assert unit.ignored == ()  # only anat NIfTI images are reported


def test_several_runs_and_acquisitions_are_all_candidates(tmp_path):
    unit = collect(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_run-2_T2w.nii.gz": None,
            "sub-01/anat/sub-01_run-1_T2w.nii.gz": None,
            "sub-01/anat/sub-01_acq-hires_T1w.nii.gz": (0.8, 0.8, 0.8),
            "sub-01/anat/sub-01_acq-lores_T1w.nii.gz": (1.0, 1.0, 1.0),
            "sub-01/anat/sub-01_ce-gadolinium_T1w.nii.gz": (0.5, 0.5, 0.5),
        },
    )["sub-01"]
    assert names(unit, "T2w") == ["sub-01_run-1_T2w.nii.gz", "sub-01_run-2_T2w.nii.gz"]
    assert names(unit, "T1w") == [
        "sub-01_acq-hires_T1w.nii.gz",
        "sub-01_acq-lores_T1w.nii.gz",
        "sub-01_ce-gadolinium_T1w.nii.gz",
    ]
    run2 = unit.candidates["T2w"][1]
    assert run2.entities["run"] == "2"
    assert unit.candidates["T1w"][2].entities["ceagent"] == "gadolinium"


def test_anat_image_fields(tmp_path):
    unit = collect(
        tmp_path / "ds",
        {
            "T2w.json": {"RepetitionTime": 3.2, "EchoTime": 0.5},
            "sub-01/anat/sub-01_run-01_T2w.nii.gz": None,
            "sub-01/anat/sub-01_run-01_T2w.json": {"EchoTime": 0.1},
        },
    )["sub-01"]
    (image,) = unit.candidates["T2w"]
    assert isinstance(image, AnatImage)
    assert image.path.is_absolute() and image.path.exists()
    assert image.filename == "sub-01_run-01_T2w.nii.gz"
    assert image.sequence == "T2w"
    assert all(isinstance(v, str) for v in image.entities.values())
    assert image.entities["run"] == "01"  # padding kept
    assert image.entities["suffix"] == "T2w" and image.entities["subject"] == "01"
    assert image.metadata == {"RepetitionTime": 3.2, "EchoTime": 0.1}  # inheritance, nearest wins
    assert set(unit.candidates) == set(SEQUENCES)
    assert AnatImage.from_dict(json.loads(json.dumps(image.to_dict()))) == image
    assert hash(image) == hash(AnatImage.from_dict(image.to_dict()))


@pytest.mark.parametrize("content", ['{"EchoTime": ', "[0.1]"])
def test_invalid_sidecar_json_names_file(tmp_path, content):
    make_bids(
        tmp_path / "ds",
        {"sub-01/anat/sub-01_T2w.nii.gz": None, "sub-01/anat/sub-01_T2w.json": content},
    )
    with pytest.raises(InputError) as info:
        load_layout(tmp_path / "ds")
    assert info.value.path == tmp_path / "ds" / "sub-01" / "anat" / "sub-01_T2w.json"


# --------------------------------------------------------------------------- subjects / sessions
def test_emptyroom_is_not_a_subject(tmp_path):
    spec = {
        "sub-01/anat/sub-01_T1w.nii.gz": None,
        "sub-emptyroom/ses-20200101/meg/sub-emptyroom_ses-20200101_task-noise_meg.json": {"x": 1},
    }
    units = collect(tmp_path / "ds", spec)
    assert list(units) == ["sub-01"]
    with pytest.raises(NothingSelectedError, match="emptyroom"):
        collect_sessions(load_layout(tmp_path / "ds"), participant_labels=["emptyroom"])


def test_subject_without_anat_is_kept_empty(tmp_path):
    units = collect(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_T1w.nii.gz": None,
            "sub-02/func/sub-02_task-rest_bold.nii.gz": None,
            "sub-03/": None,
        },
    )
    assert list(units) == ["sub-01", "sub-02", "sub-03"]
    for label in ("sub-02", "sub-03"):
        assert units[label].available == ()
        assert units[label].session is None


def test_sessions_are_separate_units(tmp_path):
    units = collect(
        tmp_path / "ds",
        {
            "sub-01/ses-1/anat/sub-01_ses-1_T2w.nii.gz": None,
            "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii": None,
            "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz": None,
            "sub-01/ses-3/func/sub-01_ses-3_task-rest_bold.nii.gz": None,
            "sub-01/ses-4/": None,
            "sub-02/anat/sub-02_FLAIR.nii.gz": None,
        },
    )
    assert list(units) == ["sub-01_ses-1", "sub-01_ses-2", "sub-01_ses-3", "sub-01_ses-4", "sub-02"]
    assert units["sub-01_ses-1"].available == ("T2w", "T1w")
    assert units["sub-01_ses-2"].available == ("T1w",)
    assert units["sub-01_ses-3"].available == ()
    assert units["sub-01_ses-4"].available == ()
    assert (units["sub-01_ses-2"].subject, units["sub-01_ses-2"].session) == ("01", "2")
    assert units["sub-02"].session is None and units["sub-02"].available == ("FLAIR",)


def test_participant_and_session_selection(tmp_path):
    spec = {
        "sub-01/ses-pre/anat/sub-01_ses-pre_T1w.nii.gz": None,
        "sub-01/ses-post/anat/sub-01_ses-post_T1w.nii.gz": None,
        "sub-02/ses-pre/anat/sub-02_ses-pre_T1w.nii.gz": None,
        "sub-03/anat/sub-03_T1w.nii.gz": None,
    }
    make_bids(tmp_path / "ds", spec)
    layout = load_layout(tmp_path / "ds")
    units = collect_sessions(layout, participant_labels=["sub-02", "01"])
    assert [u.label for u in units] == ["sub-01_ses-post", "sub-01_ses-pre", "sub-02_ses-pre"]
    units = collect_sessions(layout, session_labels=["ses-pre"])
    assert [u.label for u in units] == ["sub-01_ses-pre", "sub-02_ses-pre"]  # sub-03 has no sessions
    with pytest.raises(NothingSelectedError, match="session.*post"):
        collect_sessions(layout, participant_labels=["02"], session_labels=["post"])


def test_unknown_participant_label(tmp_path):
    spec = {f"sub-{i:02d}/anat/sub-{i:02d}_T1w.nii.gz": None for i in range(1, 16)}
    make_bids(tmp_path / "ds", spec)
    layout = load_layout(tmp_path / "ds")
    with pytest.raises(NothingSelectedError) as info:
        collect_sessions(layout, participant_labels=["01", "99", "sub-42"])
    message = str(info.value)
    assert "99, 42" in message
    assert "01, 02" in message and "(15 in all)" in message  # truncated list of available labels
    assert "15," not in message


def test_path_like_label_is_usage_error(tmp_path):
    make_bids(tmp_path / "ds", {"sub-01/anat/sub-01_T1w.nii.gz": None})
    with pytest.raises(UsageError, match=r"\.\./x"):
        collect_sessions(load_layout(tmp_path / "ds"), participant_labels=["../x"])


def test_dataset_without_subjects(tmp_path):
    make_bids(tmp_path / "ds", {"README": "empty"})
    with pytest.raises(MissingInputError, match="no subjects"):
        collect_sessions(load_layout(tmp_path / "ds"))


def test_derivatives_and_sourcedata_not_indexed(tmp_path):
    unit = collect(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_T1w.nii.gz": None,
            "derivatives/epvs/sub-01/anat/sub-01_T2w.nii.gz": None,
            "sourcedata/sub-01/anat/sub-01_FLAIR.nii.gz": None,
        },
    )["sub-01"]
    assert unit.available == ("T1w",)


# --------------------------------------------------------------------------- read-only / database
def test_bids_dir_is_not_written(tmp_path):
    root = make_bids(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_T1w.nii.gz": None,
            "sub-01/anat/sub-01_T1w.json": {"RepetitionTime": 2.3},
            "sub-02/ses-1/anat/sub-02_ses-1_T2w.nii": None,
        },
    )
    before = snapshot(root)
    collect_sessions(load_layout(root))
    database = tmp_path / "work" / "bids_db"
    collect_sessions(load_layout(root, database))
    collect_sessions(load_layout(root, database))  # reuse
    assert snapshot(root) == before
    assert any(database.iterdir())


def test_database_inside_bids_dir_refused(tmp_path):
    root = make_bids(tmp_path / "ds", {"sub-01/anat/sub-01_T1w.nii.gz": None})
    with pytest.raises(UsageError, match="outside"):
        load_layout(root, root / "derivatives" / "db")


def test_database_from_another_dataset_is_rebuilt(tmp_path):
    first = make_bids(tmp_path / "a", {"sub-01/anat/sub-01_T1w.nii.gz": None})
    second = make_bids(tmp_path / "b", {"sub-07/anat/sub-07_T2w.nii.gz": None})
    database = tmp_path / "db"
    load_layout(first, database)
    units = collect_sessions(load_layout(second, database))
    assert [u.label for u in units] == ["sub-07"]
    assert Path(units[0].candidates["T2w"][0].path).is_relative_to(second)


# --------------------------------------------------------------------------- data
def test_queries_json_is_consistent():
    queries = load_queries()
    assert set(queries["sequences"]) == set(SEQUENCES)
    assert "phase" not in queries["usable_parts"]
    for alternatives in queries["sequences"].values():
        for alt in alternatives:
            assert set(alt) <= {"filters", "acquisition_regex"}
            assert "suffix" in alt["filters"]  # sequences are matched by exact suffix


def test_session_inputs_normalises_candidates(tmp_path):
    image = AnatImage(path=tmp_path / "sub-01_T2w.nii.gz", sequence="T2w")
    unit = SessionInputs(subject="01", session="a", candidates={"T2w": [image]})
    assert unit.candidates == {"T2w": (image,), "T1w": (), "FLAIR": (), "SWI": ()}
    assert unit.label == "sub-01_ses-a" and unit.available == ("T2w",)
    with pytest.raises(ValueError, match="sequence"):
        SessionInputs(subject="01", session=None, candidates={"T1w": (image,)})
    with pytest.raises(ValueError, match="unknown sequence"):
        AnatImage(path=tmp_path / "x.nii", sequence="PD")

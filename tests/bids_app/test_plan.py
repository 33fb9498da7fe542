"""Tests of bids_app.plan: ranking, tie-breaks, plan errors and serialisation."""

from __future__ import annotations

import json
import pickle
import random
import re
from pathlib import Path

import pytest
from layouts import make_bids, make_nifti

from bids_app.errors import InputError, PlanError
from bids_app.plan import (
    FRANGI_SUPPORTED,
    RANKING,
    SessionPlan,
    choose_image,
    plan_session,
    select_combination,
    voxel_volume_mm3,
)
from bids_app.query import SEQUENCES, AnatImage, SessionInputs, collect_sessions, load_layout

_ENTITY_KEYS = {
    "sub": "subject",
    "ses": "session",
    "acq": "acquisition",
    "ce": "ceagent",
    "rec": "reconstruction",
    "run": "run",
    "echo": "echo",
    "part": "part",
}


def anat(tmp_path: Path, filename: str, sequence: str, zooms=(1.0, 1.0, 1.0), write: bool = True) -> AnatImage:
    """An AnatImage for ``filename`` (entities parsed from the name), with a tiny NIfTI on disk."""
    stem = re.sub(r"\.nii(\.gz)?$", "", filename)
    *pairs, suffix = stem.split("_")
    entities = {_ENTITY_KEYS[k]: v for k, v in (p.split("-", 1) for p in pairs)}
    entities.update(suffix=suffix, extension=filename[len(stem):], datatype="anat")
    path = tmp_path / filename
    if write:
        make_nifti(path, zooms=zooms)
    return AnatImage(path=path, sequence=sequence, entities=entities)


def inputs_for(tmp_path: Path, sequences, session: str | None = None, ignored=()) -> SessionInputs:
    candidates = {sequence: (anat(tmp_path, f"sub-01_{sequence}.nii.gz", sequence),) for sequence in sequences}
    return SessionInputs(subject="01", session=session, candidates=candidates, ignored=ignored)


# --------------------------------------------------------------------------- ranking
@pytest.mark.parametrize(
    ("available", "expected"),
    [
        ({"T2w", "FLAIR", "T1w", "SWI"}, ("T2w", "FLAIR", "T1w", "SWI")),
        ({"T2w", "FLAIR", "T1w"}, ("T2w", "FLAIR", "T1w")),
        ({"T2w", "FLAIR"}, ("T2w", "FLAIR")),
        ({"T2w", "FLAIR", "SWI"}, ("T2w", "FLAIR")),
        ({"T2w"}, ("T2w",)),
        ({"T2w", "T1w"}, ("T2w",)),  # T2w alone ranks above T2w+T1w
        ({"T2w", "T1w", "SWI"}, ("T2w",)),
        ({"T1w", "FLAIR"}, ("T1w", "FLAIR")),
        ({"T1w", "FLAIR", "SWI"}, ("T1w", "FLAIR")),
        ({"T1w"}, ("T1w",)),
        ({"T1w", "SWI"}, ("T1w",)),
        ({"FLAIR"}, ("FLAIR",)),
        ({"FLAIR", "SWI"}, ("FLAIR",)),
    ],
)
def test_select_combination_ranking(available, expected):
    combination, reason = select_combination(available)
    assert combination == expected
    assert "+".join(expected) in reason


@pytest.mark.parametrize("entry", RANKING)
def test_every_ranking_entry_is_reachable(entry):
    """Each of the 8 combinations is chosen when exactly it is available and supported."""
    assert select_combination(entry, supported=[entry])[0] == entry
    assert select_combination(SEQUENCES, supported=[entry])[0] == entry


def test_ranking_is_the_seed_study_order():
    assert len(RANKING) == 8
    assert RANKING.index(("T2w",)) < RANKING.index(("T2w", "T1w"))
    assert all(sequence in SEQUENCES for combination in RANKING for sequence in combination)


def test_t2w_t1w_chosen_when_t2w_alone_unsupported():
    supported = [("T2w", "T1w"), ("T1w",)]
    assert select_combination({"T2w", "T1w"}, supported)[0] == ("T2w", "T1w")


@pytest.mark.parametrize(
    ("available", "expected"),
    [
        (SEQUENCES, ("T2w",)),
        ({"T1w", "FLAIR"}, ("T1w",)),
        ({"T1w", "FLAIR", "SWI"}, ("T1w",)),
        ({"FLAIR", "SWI"}, ("FLAIR",)),
    ],
)
def test_supported_restriction_frangi(available, expected):
    combination, reason = select_combination(available, FRANGI_SUPPORTED)
    assert combination == expected
    assert "supports" in reason


def test_supported_order_matters():
    with pytest.raises(PlanError):
        select_combination({"T2w", "T1w"}, supported=[("T1w", "T2w")])


@pytest.mark.parametrize(
    ("available", "supported"), [((), None), (("SWI",), None), (("SWI", "T2w"), [("T1w",)])]
)
def test_select_combination_none(available, supported):
    with pytest.raises(PlanError, match="no usable input combination"):
        select_combination(available, supported)


def test_select_combination_unknown_role():
    with pytest.raises(ValueError, match="PD"):
        select_combination({"PD"})
    with pytest.raises(ValueError, match="T2"):
        select_combination({"T2w"}, supported=[("T2",)])


# --------------------------------------------------------------------------- tie-breaks
def test_single_candidate(tmp_path):
    image = anat(tmp_path, "sub-01_T2w.nii.gz", "T2w", write=False)  # header not needed
    chosen, reason = choose_image([image])
    assert chosen is image
    assert "only candidate" in reason


def test_rule1_no_contrast_agent(tmp_path):
    plain = anat(tmp_path, "sub-01_run-1_T1w.nii.gz", "T1w", zooms=(1, 1, 1))
    enhanced = anat(tmp_path, "sub-01_ce-gadolinium_run-2_T1w.nii.gz", "T1w", zooms=(0.5, 0.5, 0.5))
    chosen, reason = choose_image([enhanced, plain])
    assert chosen == plain
    assert "contrast agent" in reason


def test_rule1_contrast_only_still_usable(tmp_path):
    low = anat(tmp_path, "sub-01_ce-gad_run-1_T1w.nii.gz", "T1w", zooms=(1, 1, 1))
    high = anat(tmp_path, "sub-01_ce-gad_run-2_T1w.nii.gz", "T1w", zooms=(1, 1, 1))
    assert choose_image([high, low])[0] == high


def test_rule2_swi_prefers_megre_last_echo(tmp_path):
    processed = anat(tmp_path, "sub-01_acq-SWI_T2starw.nii.gz", "SWI", zooms=(0.5, 0.5, 0.5))
    echoes = [
        anat(tmp_path, f"sub-01_echo-{e}_part-mag_MEGRE.nii.gz", "SWI", zooms=(1, 1, 1))
        for e in (1, 2, 10, 3)
    ]
    chosen, reason = choose_image([processed, *echoes])
    assert chosen.filename == "sub-01_echo-10_part-mag_MEGRE.nii.gz"  # numeric, not lexicographic
    assert "multi-echo" in reason and "last echo" in reason


def test_rule2_other_roles_prefer_combined_then_first_echo(tmp_path):
    combined = anat(tmp_path, "sub-01_acq-MEMPRAGErms_T1w.nii.gz", "T1w", zooms=(1, 1, 1))
    echoes = [
        anat(tmp_path, f"sub-01_acq-MEMPRAGE_echo-{e}_T1w.nii.gz", "T1w", zooms=(0.8, 0.8, 0.8))
        for e in (2, 1)
    ]
    assert choose_image([*echoes, combined])[0] == combined
    chosen, reason = choose_image(echoes)
    assert chosen.entities["echo"] == "1"
    assert "first echo" in reason


def test_rule3_finest_resolution(tmp_path):
    fine = anat(tmp_path, "sub-01_acq-hires_run-1_T2w.nii.gz", "T2w", zooms=(0.8, 0.8, 0.8))
    coarse = anat(tmp_path, "sub-01_acq-lores_run-2_T2w.nii.gz", "T2w", zooms=(1.0, 1.0, 1.0))
    aniso = anat(tmp_path, "sub-01_acq-aniso_run-3_T2w.nii.gz", "T2w", zooms=(0.5, 0.5, 3.0))
    chosen, reason = choose_image([coarse, aniso, fine])
    assert chosen == fine  # 0.512 mm³ < 0.75 mm³ < 1 mm³, despite the lower run
    assert "finest resolution" in reason and "0.512" in reason


def test_rule3_tolerance_then_rule4_run(tmp_path):
    run1 = anat(tmp_path, "sub-01_run-1_FLAIR.nii.gz", "FLAIR", zooms=(1.0, 1.0, 1.0))
    run2 = anat(tmp_path, "sub-01_run-2_FLAIR.nii.gz", "FLAIR", zooms=(1.0, 1.0, 1.00001))
    chosen, reason = choose_image([run1, run2])
    assert chosen == run2
    assert "highest run" in reason and "resolution" not in reason


def test_rule4_run_is_numeric(tmp_path):
    images = [anat(tmp_path, f"sub-01_run-{r}_T2w.nii.gz", "T2w") for r in ("2", "10", "09")]
    assert choose_image(images)[0].entities["run"] == "10"


def test_rule5_filename(tmp_path):
    b = anat(tmp_path, "sub-01_acq-b_T2w.nii.gz", "T2w")
    a = anat(tmp_path, "sub-01_acq-a_T2w.nii.gz", "T2w")
    chosen, reason = choose_image([b, a])
    assert chosen == a
    assert "alphabetically first" in reason


def test_choice_is_order_independent(tmp_path):
    images = [
        anat(tmp_path, "sub-01_acq-x_run-1_T2w.nii.gz", "T2w", zooms=(0.9, 0.9, 0.9)),
        anat(tmp_path, "sub-01_acq-y_run-1_T2w.nii.gz", "T2w", zooms=(0.9, 0.9, 0.9)),
        anat(tmp_path, "sub-01_acq-z_run-2_T2w.nii.gz", "T2w", zooms=(0.9, 0.9, 0.9)),
        anat(tmp_path, "sub-01_ce-gad_T2w.nii.gz", "T2w", zooms=(0.5, 0.5, 0.5)),
    ]
    rng = random.Random(0)
    results = set()
    for _ in range(5):
        rng.shuffle(images)
        results.add(choose_image(images))
    assert len(results) == 1
    assert next(iter(results))[0].filename == "sub-01_acq-z_run-2_T2w.nii.gz"


def test_choose_image_errors(tmp_path):
    with pytest.raises(ValueError):
        choose_image([])
    t2 = anat(tmp_path, "sub-01_T2w.nii.gz", "T2w")
    t1 = anat(tmp_path, "sub-01_T1w.nii.gz", "T1w")
    with pytest.raises(ValueError, match="mix sequences"):
        choose_image([t2, t1])
    broken = tmp_path / "sub-01_run-2_T2w.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(InputError) as info:
        choose_image([t2, AnatImage(path=broken, sequence="T2w", entities={"run": "2"})])
    assert info.value.path == broken


def test_voxel_volume_units(tmp_path):
    assert voxel_volume_mm3(make_nifti(tmp_path / "a.nii", zooms=(0.5, 0.5, 2.0))) == pytest.approx(0.5)
    microns = make_nifti(tmp_path / "b.nii.gz", zooms=(800, 800, 800))
    import nibabel as nib

    img = nib.load(microns)
    img.header.set_xyzt_units("micron")
    nib.save(nib.Nifti1Image(img.get_fdata(), img.affine, img.header), microns)
    assert voxel_volume_mm3(microns) == pytest.approx(0.512)


# --------------------------------------------------------------------------- plan_session
def test_plan_frangi_uses_best_single_sequence(tmp_path):
    plan = plan_session(inputs_for(tmp_path, SEQUENCES), method="frangi", supported=FRANGI_SUPPORTED)
    assert plan.combination == ("T2w",)
    assert plan.reference == "T2w"
    assert plan.reference_image.filename == "sub-01_T2w.nii.gz"
    assert plan.model_id == "frangi"
    assert list(plan.images) == ["T2w", "T1w", "FLAIR", "SWI"]  # all sequences, for QC
    assert any("QC only" in r for r in plan.reasons)
    assert plan.label == "sub-01"


def test_plan_model_ids(tmp_path):
    model_ids = {("T2w", "FLAIR"): "unet-t2flair-v1", ("T1w",): "unet-t1-v1"}
    inputs = inputs_for(tmp_path, ("T2w", "FLAIR", "T1w"), session="1")
    plan = plan_session(inputs, method="unet", model_ids=model_ids)
    assert plan.combination == ("T2w", "FLAIR")
    assert plan.model_id == "unet-t2flair-v1"
    assert plan.method == "unet" and plan.label == "sub-01_ses-1"
    with pytest.raises(PlanError, match="no model"):
        plan_session(inputs, method="unet", supported=[("T2w",)], model_ids=model_ids)


def test_plan_error_names_unit_and_findings(tmp_path):
    inputs = inputs_for(
        tmp_path, ("SWI",), session="2", ignored=(("/d/sub-01_ses-2_inplaneT2.nii.gz", "2D in-plane image"),)
    )
    with pytest.raises(PlanError) as info:
        plan_session(inputs, supported=FRANGI_SUPPORTED)
    message = str(info.value)
    assert message.startswith("sub-01_ses-2:")
    assert "found: SWI" in message and "sub-01_ses-2_inplaneT2.nii.gz" in message


def test_plan_error_without_anatomy():
    with pytest.raises(PlanError, match="sub-05: .*no usable anatomical image"):
        plan_session(SessionInputs(subject="05", session=None))


def test_plan_is_pure(tmp_path):
    inputs = inputs_for(tmp_path, ("T1w", "FLAIR"))
    snapshot = SessionInputs(inputs.subject, inputs.session, dict(inputs.candidates), inputs.ignored)
    first = plan_session(inputs)
    assert plan_session(inputs) == first
    assert inputs == snapshot


def test_to_dict_json_round_trip(tmp_path):
    inputs = inputs_for(tmp_path, ("T2w", "T1w", "SWI"), session="1", ignored=(("/x/p.nii.gz", "phase"),))
    plan = plan_session(inputs)
    data = plan.to_dict()
    text = json.dumps(data)
    assert json.loads(text) == data
    assert data["images"]["T2w"]["path"] == str(tmp_path / "sub-01_T2w.nii.gz")
    assert data["reference"] == "T2w" and data["label"] == "sub-01_ses-1"
    assert SessionPlan.from_dict(json.loads(text)) == plan
    assert pickle.loads(pickle.dumps(plan)) == plan  # nipype may pickle plans


def test_session_plan_validates():
    with pytest.raises(ValueError, match="no image"):
        SessionPlan(
            subject="01", session=None, method="frangi", combination=("T2w",), images={}, model_id="frangi"
        )


def test_collect_then_plan_end_to_end(tmp_path):
    root = make_bids(
        tmp_path / "ds",
        {
            "sub-01/anat/sub-01_run-1_T2w.nii.gz": (1.0, 1.0, 1.0),
            "sub-01/anat/sub-01_run-2_T2w.nii.gz": (1.0, 1.0, 1.0),
            "sub-01/anat/sub-01_acq-lores_T1w.nii.gz": (1.2, 1.2, 1.2),
            "sub-01/anat/sub-01_acq-hires_T1w.nii": (0.9, 0.9, 0.9),
            "sub-01/anat/sub-01_ce-gadolinium_T1w.nii.gz": (0.5, 0.5, 0.5),
            "sub-01/anat/sub-01_echo-1_part-mag_MEGRE.nii.gz": None,
            "sub-01/anat/sub-01_echo-2_part-mag_MEGRE.nii.gz": None,
            "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.nii.gz": None,
            "sub-01/anat/sub-01_inplaneT2.nii.gz": None,
            "sub-02/anat/sub-02_inplaneT2.nii.gz": None,
        },
    )
    units = collect_sessions(load_layout(root))
    plan = plan_session(units[0], supported=FRANGI_SUPPORTED)
    assert plan.combination == ("T2w",)
    assert {sequence: image.filename for sequence, image in plan.images.items()} == {
        "T2w": "sub-01_run-2_T2w.nii.gz",
        "T1w": "sub-01_acq-hires_T1w.nii",
        "SWI": "sub-01_echo-2_part-mag_MEGRE.nii.gz",
    }
    assert len(plan.ignored) == 2
    with pytest.raises(PlanError, match="sub-02: .*inplaneT2"):
        plan_session(units[1], supported=FRANGI_SUPPORTED)

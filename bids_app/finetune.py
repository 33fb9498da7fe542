"""``epvs-bids-finetune``: fine-tune the shipped model on a user's manual ePVS masks, with k-fold evaluation.

Manual masks are a BIDS-Derivatives folder of ``sub-<l>[_ses-<s>]..._label-PVS[_desc-<d>]_mask.nii.gz``
files on the grid of the reference image (the first sequence of ``--sequences``). The source images
are found in the BIDS dataset and preprocessed exactly as at the participant level; the k-fold
metrics before and after fine-tuning are printed and saved with the new model.

The folder may be an epvs-bids output folder holding reviewed masks (``desc-reviewed<Rater>``, written
by ``epvs-bids-edits apply``, ``docs/edits.md``): those are taken, one per unit (``--rater`` picks a
rater when several reviewed a unit), and the automatic masks (``desc-<combination>``, e.g.
``desc-T2w``) never are: an automatic mask is the model's output, not a label.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import EXIT_OK, EpvsError, InputError, MissingInputError, UsageError

LOGGER = logging.getLogger(__name__)
_MASK = re.compile(r"sub-(?P<sub>[a-zA-Z0-9]+)(?:_ses-(?P<ses>[a-zA-Z0-9]+))?_.*label-PVS.*_mask\.nii(\.gz)?$")


def mask_kind(name: str) -> str:
    """``reviewed``, ``automatic`` or ``manual``: what an ePVS mask file is, from its ``desc`` entity.

    ``desc-reviewed<Rater>`` is a rater's review (``epvs-bids-edits``); a ``desc`` made of sequences
    (``T2w``, ``T2wFLAIR``...) is this app's automatic output; anything else (``desc-manual``, no
    ``desc``) is a manual mask.
    """
    from .io_spec import entities, split_combination

    desc = entities(name).get("desc", "")
    if desc.startswith("reviewed") and len(desc) > len("reviewed"):
        return "reviewed"
    try:
        return "automatic" if desc and split_combination(desc) else "manual"
    except ValueError:
        return "manual"


def find_masks(masks_dir: Path, rater: str | None = None) -> list[tuple[str, str | None, Path]]:
    """(subject, session, path) of every label mask in a derivatives folder: reviewed or manual, never automatic.

    Parameters
    ----------
    masks_dir : Path
        A BIDS-Derivatives folder (an epvs-bids output folder with reviewed masks, or manual masks).
    rater : str, optional
        Rater tag: only the masks ``desc-reviewed<rater>`` are taken.

    Raises
    ------
    MissingInputError
        No label mask (only automatic masks, or none; or none of ``rater``).
    UsageError
        Several raters reviewed a unit and ``rater`` is not given.
    """
    found = [(m["sub"], m["ses"], path) for path in sorted(Path(masks_dir).rglob("*_mask.nii*"))
             if (m := _MASK.match(path.name))]
    kinds = {path: mask_kind(path.name) for _, _, path in found}
    if rater is not None:
        out = [f for f in found if _desc(f[2]) == f"reviewed{rater}"]
        if not out:
            raise MissingInputError(f"no mask reviewed by rater {rater!r} (*_desc-reviewed{rater}_mask.nii.gz)",
                                    masks_dir)
        return out
    reviewed = [f for f in found if kinds[f[2]] == "reviewed"]
    _one_rater_per_unit(reviewed, masks_dir)
    out = [f for f in found if kinds[f[2]] == "manual"] + reviewed
    if not out and found:
        raise MissingInputError(f"only automatic ePVS masks ({found[0][2].name}, ...): an automatic mask is the "
                                "model's output, not a label; review them first (epvs-bids-edits apply, "
                                "docs/edits.md) or give manual masks", masks_dir)
    return sorted(out, key=lambda f: (f[0], f[1] or "", str(f[2])))


def _desc(path: Path) -> str:
    from .io_spec import entities

    return entities(path.name).get("desc", "")


def _one_rater_per_unit(reviewed: list, masks_dir: Path) -> None:
    """Refuse a unit reviewed by several raters: which one is the label must be chosen (``--rater``)."""
    raters: dict[tuple, list[str]] = {}
    for sub, ses, path in reviewed:
        raters.setdefault((sub, ses), []).append(_desc(path)[len("reviewed"):])
    several = {k: v for k, v in raters.items() if len(v) > 1}
    if several:
        (sub, ses), tags = next(iter(several.items()))
        unit = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
        raise UsageError(f"{masks_dir}: {unit} was reviewed by several raters ({', '.join(tags)}): "
                         "pick one with --rater")


def build_cases(bids_dir: Path, masks_dir: Path, sequences: tuple[str, ...], work_dir: Path, seed: int = 42,
                validate: bool = True, rater: str | None = None):
    """Preprocess every unit with a manual mask into training cases (normalised as at inference).

    The dataset goes through the participant level's intake (:func:`bids_app.intake.take_in`) and
    preprocessing (:func:`bids_app.participant.preprocess_unit`, same cache), so a case is what the
    model sees when the participant level runs.
    """
    from epvsseg.train import Case

    from .intake import take_in
    from .plan import plan_session

    masks = find_masks(masks_dir, rater)
    if not masks:
        raise MissingInputError("no *_label-PVS*_mask.nii.gz files found", masks_dir)
    intake = take_in(bids_dir, index_dir=work_dir / "pybids_db_finetune", validate=validate,
                     participant_labels=sorted({sub for sub, _, _ in masks}))
    units = {(u.subject, u.session): u for u in intake.units}
    cases = []
    for sub, ses, mpath in masks:
        unit = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
        if unit in intake.failed:
            raise intake.failed[unit]
        if (sub, ses) not in units:
            raise MissingInputError(f"no images of {unit} in the BIDS dataset for this mask", mpath)
        plan = plan_session(units[(sub, ses)], method="unet", supported=(sequences,))
        images, label, mask, affine = _case_arrays(plan, mpath, sequences, work_dir, seed)
        cases.append(Case(images, label & mask, np.zeros(label.shape, np.uint8), mask, affine=affine))
        LOGGER.info("%s: %d labelled ePVS voxels", plan.label, int(label.sum()))
    return cases


def _case_arrays(plan, mpath: Path, sequences: tuple[str, ...], work_dir: Path, seed: int):
    """Normalised input volumes, the manual label, the brain mask and the affine of one unit's RAS+ grid."""
    from epvsprep import ops
    from epvsseg.infer import normalise

    from .participant import preprocess_unit

    pre = preprocess_unit(plan, work_dir=work_dir / plan.label, seed=seed)
    try:
        label_img = ops.load(mpath)
    except ops.ImageError as exc:
        raise InputError(exc.problem, mpath) from exc
    ref = pre.originals[plan.reference]
    if label_img.shape[:3] != ref.shape[:3] or not np.allclose(label_img.affine, ref.affine, atol=1e-3):
        raise InputError(f"mask grid {label_img.shape} does not match the reference image "
                         f"{plan.images[plan.reference].filename} {ref.shape}", mpath)
    # same grid as the reference: reorienting to RAS+ (as conform did to the image) aligns it
    label = np.asanyarray(nib.as_closest_canonical(label_img).dataobj) > 0.5
    vols = {plan.reference: np.asanyarray(pre.n4.dataobj).astype(np.float32),
            **{r: np.asanyarray(im.dataobj).astype(np.float32) for r, im in pre.coregistered.items()}}
    return {c: normalise(vols[c], pre.mask) for c in sequences}, label, pre.mask, pre.n4.affine


def _base_spec(model: str | None):
    """The base model's spec (hash checked); its errors as the app's (exit 65, or 66 when missing)."""
    from epvsseg.spec import SpecError, load_spec

    try:
        return load_spec(model)
    except SpecError as exc:
        if model is not None and Path(model).is_dir():
            raise InputError(str(exc)) from None
        raise MissingInputError(str(exc), model or "epvsseg/weights") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="epvs-bids-finetune", description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("masks_dir", type=Path, help="BIDS-Derivatives folder with *_label-PVS*_mask.nii.gz: "
                        "manual masks, or an epvs-bids output folder with reviewed masks (never automatic ones)")
    parser.add_argument("--rater", default=None, metavar="TAG",
                        help="take only the masks reviewed by this rater (desc-reviewed<TAG>)")
    parser.add_argument("output_model", type=Path, help="folder to write the fine-tuned model to")
    parser.add_argument("--sequences", nargs="+", default=["T2w"], help="input sequences, reference first")
    parser.add_argument("--base-model", default=None, help="model id or folder (default: the shipped model)")
    parser.add_argument("--folds", type=int, default=5, help="k for k-fold; >= number of cases = leave-one-out")
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=20261121)
    parser.add_argument("-w", "--work-dir", type=Path, default=None)
    parser.add_argument("--skip-bids-validation", action="store_true", help="do not run the BIDS validator")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname)s] %(message)s")
    try:
        from epvsseg.infer import load_model
        from epvsseg.train import FinetuneConfig, finetune

        base_spec = _base_spec(opts.base_model)
        sequences = tuple(opts.sequences)
        if sequences not in base_spec.combinations:
            raise UsageError(f"--sequences {' '.join(sequences)} is not a combination that {base_spec.model_id} "
                             f"serves: {['+'.join(c) for c in base_spec.combinations]}")
        work = (opts.work_dir or opts.output_model.parent / "work-finetune").absolute()
        cases = build_cases(opts.bids_dir.absolute(), opts.masks_dir, sequences, work, opts.seed,
                            validate=not opts.skip_bids_validation, rater=opts.rater)
        base = load_model(base_spec)
        cfg = FinetuneConfig(folds=opts.folds, iterations=opts.iterations, threads=opts.threads, seed=opts.seed,
                             combination=sequences)
        summary = finetune(base, cases, cfg, out=opts.output_model)
    except EpvsError as exc:
        LOGGER.error("%s", exc)
        return exc.exit_code
    print(json.dumps({"mean_before": summary["mean_before"], "mean_after": summary["mean_after"]}, indent=2))
    print(f"fine-tuned model: {opts.output_model}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Turn the candidate images of one session into a processing plan.

:func:`plan_session` is pure apart from reading NIfTI *headers* (never voxel
data) when several images compete for one sequence. The plan records which input
combination is used, the one image chosen per sequence, and human-readable reasons
that go into the report; it is saved next to the outputs (:meth:`SessionPlan.to_dict`).

The ranking of input combinations follows the seed study (Rashid et al. 2023),
best first; see ``docs/ingestion.md`` for the tie-break rules between several
images of one sequence.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, PlanError
from .query import SEQUENCES, AnatImage, SessionInputs, unit_label

LOGGER = logging.getLogger(__name__)

#: Input combinations, best first (seed study, Rashid 2023). ``combination[0]`` is
#: the reference space. Note that T2w alone ranks above T2w+T1w.
RANKING: tuple[tuple[str, ...], ...] = (
    ("T2w", "FLAIR", "T1w", "SWI"),
    ("T2w", "FLAIR", "T1w"),
    ("T2w", "FLAIR"),
    ("T2w",),
    ("T2w", "T1w"),
    ("T1w", "FLAIR"),
    ("T1w",),
    ("FLAIR",),
)

#: Combinations the single-sequence Frangi baseline supports (pass as ``supported``).
FRANGI_SUPPORTED: tuple[tuple[str, ...], ...] = (("T2w",), ("T1w",), ("FLAIR",))

#: Sequences for which echo-resolved (multi-echo, MEGRE) images are preferred, and the
#: last echo (longest TE, strongest susceptibility weighting) is taken. For the
#: other sequences a combined / single-echo image is preferred, then the first echo
#: (highest SNR, least susceptibility artefact).
LAST_ECHO_SEQUENCES: frozenset[str] = frozenset({"SWI"})

#: Relative tolerance when comparing voxel volumes (headers store float32 zooms).
VOXEL_VOLUME_RTOL = 1e-3

_LENGTH_TO_MM = {"mm": 1.0, "meter": 1000.0, "micron": 1e-3}


# --------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class SessionPlan:
    """What to run for one unit of work, and why.

    Parameters
    ----------
    subject : str
        Subject label without ``sub-``.
    session : str or None
        Session label without ``ses-``; ``None`` without a session level.
    method : str
        Segmentation method, e.g. ``"frangi"``.
    combination : tuple of str
        Input sequences the method uses, in order; ``combination[0]`` is the reference.
    images : Mapping[str, AnatImage]
        The one chosen image for every sequence that had candidates (also sequences not
        in ``combination``: they are co-registered for QC).
    model_id : str
        ``"frangi"`` for the baseline; a weights id for learned models.
    reasons : tuple of str
        Sentences explaining the combination and each image choice.
    ignored : tuple of (str, str)
        ``(path, reason)`` of images deliberately not used.
    """

    subject: str
    session: str | None
    method: str
    combination: tuple[str, ...]
    images: Mapping[str, AnatImage] = field(hash=False)
    model_id: str
    reasons: tuple[str, ...] = ()
    ignored: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "combination", tuple(self.combination))
        object.__setattr__(self, "images", dict(self.images))
        object.__setattr__(self, "reasons", tuple(self.reasons))
        object.__setattr__(self, "ignored", tuple((str(p), str(r)) for p, r in self.ignored))
        if not self.combination:
            raise ValueError("a plan needs at least one input sequence")
        missing = [sequence for sequence in self.combination if sequence not in self.images]
        if missing:
            raise ValueError(f"no image for sequence(s) {missing} of the combination {self.combination}")

    @property
    def reference(self) -> str:
        """str: The reference sequence (``combination[0]``)."""
        return self.combination[0]

    @property
    def reference_image(self) -> AnatImage:
        """AnatImage: The chosen image of the reference sequence."""
        return self.images[self.reference]

    @property
    def label(self) -> str:
        """str: ``"sub-01_ses-1"`` or ``"sub-01"``."""
        return unit_label(self.subject, self.session)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dictionary (paths as ``str``).

        Returns
        -------
        dict
            All fields, plus ``label`` and ``reference`` for readers of the JSON.
        """
        return {
            "subject": self.subject,
            "session": self.session,
            "label": self.label,
            "method": self.method,
            "model_id": self.model_id,
            "combination": list(self.combination),
            "reference": self.reference,
            "images": {sequence: image.to_dict() for sequence, image in self.images.items()},
            "reasons": list(self.reasons),
            "ignored": [[path, reason] for path, reason in self.ignored],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SessionPlan:
        """Rebuild a plan from :meth:`to_dict` output (e.g. a saved plan JSON).

        Parameters
        ----------
        data : Mapping[str, Any]
            A dictionary as written by :meth:`to_dict`.

        Returns
        -------
        SessionPlan
        """
        return cls(
            subject=data["subject"],
            session=data.get("session"),
            method=data["method"],
            combination=tuple(data["combination"]),
            images={sequence: AnatImage.from_dict(image) for sequence, image in data["images"].items()},
            model_id=data["model_id"],
            reasons=tuple(data.get("reasons", ())),
            ignored=tuple((p, r) for p, r in data.get("ignored", ())),
        )


# --------------------------------------------------------------------------- image choice
def voxel_volume_mm3(path: Path) -> float:
    """Return the voxel volume of a NIfTI image, reading only its header.

    Parameters
    ----------
    path : Path
        A ``.nii`` or ``.nii.gz`` file.

    Returns
    -------
    float
        Product of the first three ``pixdim`` values in mm³ (converted from the
        header's spatial unit; "unknown" is taken as mm). ``inf`` if a zoom is
        not positive.

    Raises
    ------
    InputError
        If the header cannot be read.
    """
    import nibabel as nib

    try:
        header = nib.load(Path(path)).header  # lazy: the voxel data are not read
        zooms = [float(z) for z in header.get_zooms()[:3]]
        unit = header.get_xyzt_units()[0] if hasattr(header, "get_xyzt_units") else "mm"
    except Exception as exc:  # noqa: BLE001 - any nibabel failure means an unreadable image
        raise InputError(f"cannot read the NIfTI header ({exc})", path) from None
    if not zooms or any(not z > 0 or not math.isfinite(z) for z in zooms):
        LOGGER.warning("%s: voxel sizes %s are not positive; ranked last by resolution", path, zooms)
        return math.inf
    scale = _LENGTH_TO_MM.get(unit, 1.0)
    return math.prod(z * scale for z in zooms)


def _run_number(image: AnatImage) -> int:
    try:
        return int(image.entities.get("run", 0))
    except ValueError:
        return 0


def _echo_number(image: AnatImage) -> int | None:
    echo = image.entities.get("echo")
    try:
        return int(echo) if echo is not None else None
    except ValueError:
        return None


def _keep_best(
    images: list[AnatImage], score: Callable[[AnatImage], float], *, highest: bool
) -> list[AnatImage]:
    values = {id(im): score(im) for im in images}
    best = max(values.values()) if highest else min(values.values())
    return [im for im in images if values[id(im)] == best]


def choose_image(candidates: Sequence[AnatImage]) -> tuple[AnatImage, str]:
    """Choose one image among several candidates for the same sequence.

    The rules are applied in order; each one keeps only the best images, and the
    next rule breaks the remaining ties:

    1. no contrast agent: images without a ``ce-`` entity win;
    2. echoes: for SWI (:data:`LAST_ECHO_SEQUENCES`), echo-resolved images (``echo-``
       entity or ``MEGRE`` suffix) win, then the highest echo number (longest
       TE); for the other sequences, images without ``echo-`` (single-echo or
       combined) win, then the lowest echo number;
    3. finest resolution: smallest voxel volume in mm³ from the NIfTI header
       (equal within a relative tolerance of :data:`VOXEL_VOLUME_RTOL`);
    4. latest repeat: highest ``run-`` number (no ``run-`` counts as 0);
    5. alphabetically first file name.

    Parameters
    ----------
    candidates : sequence of AnatImage
        At least one image, all of the same sequence.

    Returns
    -------
    image : AnatImage
        The chosen image.
    reason : str
        One sentence naming the image and the rules that decided.

    Raises
    ------
    ValueError
        If ``candidates`` is empty or mixes sequences.
    InputError
        If a NIfTI header must be read (rule 3) and cannot be.
    """
    if not candidates:
        raise ValueError("choose_image needs at least one candidate")
    sequences = {im.sequence for im in candidates}
    if len(sequences) > 1:
        raise ValueError(f"candidates mix sequences {sorted(sequences)}")
    sequence = candidates[0].sequence
    remaining = sorted(candidates, key=lambda im: (im.filename, str(im.path)))
    total = len(remaining)
    if total == 1:
        return remaining[0], f"{sequence}: {remaining[0].filename} (the only candidate)."
    why: list[str] = []

    # 1. contrast agent
    plain = [im for im in remaining if "ceagent" not in im.entities]
    if plain and len(plain) < len(remaining):
        why.append(f"without contrast agent ({len(remaining) - len(plain)} ce- image(s) set aside)")
        remaining = plain

    # 2. echoes
    if len(remaining) > 1:
        if sequence in LAST_ECHO_SEQUENCES:
            resolved = [
                im for im in remaining if _echo_number(im) is not None or im.entities.get("suffix") == "MEGRE"
            ]
            if resolved and len(resolved) < len(remaining):
                remaining = resolved
                why.append("multi-echo (MEGRE) acquisition preferred")
            last = _keep_best(remaining, lambda im: _echo_number(im) or 0, highest=True)
            if len(last) < len(remaining):
                why.append(f"last echo (echo-{last[0].entities['echo']}, strongest susceptibility weighting)")
                remaining = last
        else:
            single = [im for im in remaining if _echo_number(im) is None]
            if single and len(single) < len(remaining):
                remaining = single
                why.append("single-echo or echo-combined image preferred")
            else:
                first = _keep_best(remaining, lambda im: _echo_number(im) or 0, highest=False)
                if len(first) < len(remaining):
                    why.append(f"first echo (echo-{first[0].entities['echo']}, highest SNR)")
                    remaining = first

    # 3. resolution (header only)
    if len(remaining) > 1:
        volumes = {id(im): voxel_volume_mm3(im.path) for im in remaining}
        finest = min(volumes.values())
        fine = [
            im
            for im in remaining
            if volumes[id(im)] == finest
            or (math.isfinite(finest) and math.isclose(volumes[id(im)], finest, rel_tol=VOXEL_VOLUME_RTOL))
        ]
        if len(fine) < len(remaining):
            coarsest = max(v for v in volumes.values())
            why.append(f"finest resolution ({finest:.4g} mm³ voxels vs up to {coarsest:.4g} mm³)")
            remaining = fine

    # 4. run
    if len(remaining) > 1:
        latest = _keep_best(remaining, _run_number, highest=True)
        if len(latest) < len(remaining):
            why.append(f"highest run (run-{latest[0].entities['run']})")
            remaining = latest

    # 5. file name (``remaining`` is sorted by file name)
    if len(remaining) > 1:
        why.append(f"alphabetically first of {len(remaining)} otherwise equal images")

    chosen = remaining[0]
    return chosen, f"{sequence}: {chosen.filename} chosen among {total} candidates: {'; '.join(why)}."


# --------------------------------------------------------------------------- combination
def _check_sequences(sequences: Iterable[str], what: str) -> None:
    unknown = [sequence for sequence in sequences if sequence not in SEQUENCES]
    if unknown:
        raise ValueError(f"unknown sequence(s) {unknown} in {what}; expected {', '.join(SEQUENCES)}")


def select_combination(
    available: Iterable[str], supported: Sequence[tuple[str, ...]] | None = None
) -> tuple[tuple[str, ...], str]:
    """Pick the best input combination from :data:`RANKING`.

    Parameters
    ----------
    available : iterable of str
        Sequences with at least one usable image.
    supported : sequence of tuple of str, optional
        Combinations the method can run, compared as ordered tuples (the order is
        the model's channel order). ``None`` accepts every :data:`RANKING` entry.
        Entries not in :data:`RANKING` are never chosen.

    Returns
    -------
    combination : tuple of str
        The first :data:`RANKING` entry whose sequences are all available and which
        is supported.
    reason : str
        One sentence explaining the choice.

    Raises
    ------
    PlanError
        If no entry qualifies.
    ValueError
        If a sequence name is unknown.
    """
    found = [sequence for sequence in SEQUENCES if sequence in set(available)]
    _check_sequences(set(available), "available")
    allowed: set[tuple[str, ...]] | None = None
    if supported is not None:
        allowed = {tuple(combination) for combination in supported}
        for combination in allowed:
            _check_sequences(combination, "supported")
        unused = allowed - set(RANKING)
        if unused:
            LOGGER.debug("supported combination(s) not in RANKING, never chosen: %s", sorted(unused))
    found_text = ", ".join(found) if found else "no usable anatomical image"
    for rank, combination in enumerate(RANKING, start=1):
        if all(sequence in found for sequence in combination) and (allowed is None or combination in allowed):
            restriction = " and that the method supports" if allowed is not None else ""
            return combination, (
                f"Input combination {'+'.join(combination)} (reference {combination[0]}): the best-ranked combination "
                f"(rank {rank} of {len(RANKING)}, Rashid 2023) whose sequences are all present{restriction} "
                f"(found: {found_text})."
            )
    supported_text = (
        "; supported: " + ", ".join("+".join(c) for c in supported) if supported is not None else ""
    )
    raise PlanError(f"no usable input combination (found: {found_text}{supported_text})")


def plan_session(
    inputs: SessionInputs,
    *,
    method: str = "unet",
    supported: Sequence[tuple[str, ...]] | None = None,
    model_ids: Mapping[tuple[str, ...], str] | None = None,
) -> SessionPlan:
    """Plan one unit of work from its candidate images.

    Parameters
    ----------
    inputs : SessionInputs
        Candidates of one subject/session (from :func:`bids_app.query.collect_sessions`).
    method : str, optional
        Segmentation method name, recorded in the plan.
    supported : sequence of tuple of str, optional
        Combinations the method supports (:data:`FRANGI_SUPPORTED` for the Frangi
        baseline). Defaults to the keys of ``model_ids`` when those are given,
        else every :data:`RANKING` entry.
    model_ids : Mapping[tuple of str, str], optional
        Weights id per combination for learned models; ``model_id`` is ``method``
        when omitted.

    Returns
    -------
    SessionPlan
        One image per sequence with candidates, the combination, and the reasons.

    Raises
    ------
    PlanError
        Naming the unit and what was found, if no supported combination is
        available or ``model_ids`` has no entry for the chosen combination.
    InputError
        If a NIfTI header needed for a tie-break cannot be read.
    """
    if supported is None and model_ids is not None:
        supported = tuple(model_ids)
    try:
        combination, combination_reason = select_combination(inputs.available, supported)
    except PlanError as exc:
        ignored = ""
        if inputs.ignored:
            listed = "; ".join(f"{Path(p).name}: {r}" for p, r in inputs.ignored[:3])
            more = f" (+{len(inputs.ignored) - 3} more)" if len(inputs.ignored) > 3 else ""
            ignored = f"; ignored: {listed}{more}"
        raise PlanError(f"{inputs.label}: {exc.problem}{ignored}") from None

    if model_ids is not None:
        if combination not in model_ids:
            raise PlanError(f"{inputs.label}: no model for the input combination {'+'.join(combination)}")
        model_id = model_ids[combination]
    else:
        model_id = method

    order = list(combination) + [sequence for sequence in SEQUENCES if sequence not in combination]
    images: dict[str, AnatImage] = {}
    image_reasons: list[str] = []
    for sequence in order:
        candidates = inputs.candidates.get(sequence, ())
        if not candidates:
            continue
        image, reason = choose_image(candidates)
        images[sequence] = image
        if sequence not in combination:
            reason = f"{reason[:-1]}; used for QC only (not a method input)."
        image_reasons.append(reason)

    reasons = [combination_reason, *image_reasons]
    if inputs.ignored:
        reasons.append(f"{len(inputs.ignored)} anatomical image(s) ignored (see 'ignored').")
    plan = SessionPlan(
        subject=inputs.subject,
        session=inputs.session,
        method=method,
        combination=combination,
        images=images,
        model_id=model_id,
        reasons=tuple(reasons),
        ignored=inputs.ignored,
    )
    LOGGER.info("%s: %s on %s (model %s)", plan.label, method, "+".join(combination), model_id)
    return plan

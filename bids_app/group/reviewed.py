"""Reviewed results: automatic ePVS masks against the raters' reviewed masks, and raters against each other.

``epvs-bids-edits apply`` writes, beside a unit's automatic outputs, the reviewed ones of each
rater under the same names with ``desc-reviewed<RaterTag>`` in place of the combination
(``sub-01_label-PVS_desc-reviewedJD_mask.nii.gz``). They are not automatic units (their desc is not
a combination, so :func:`bids_app.io_spec.find_units` skips them). A reviewed mask belongs to the
automatic unit of the same stem whose combination its sidecar names (``Sources``: the automatic
file reviewed; else ``InputSequences``); with neither, to the stem's only unit.

Both comparisons use the agreement suite of :mod:`bids_app.group.agreement` per unit and region
(this run's region atlas): automatic (prediction) against each reviewed mask (reference), and for
every pair of raters of one unit, rater A (prediction) against rater B (reference; A before B by
tag, so Dice, cluster F1 and volumetric similarity are symmetric, sensitivity and precision swap).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from .. import io_spec
from .collect import Unit

LOGGER = logging.getLogger(__name__)

#: The desc prefix of reviewed derivatives (the rater tag follows).
PREFIX = "reviewed"


@dataclass(frozen=True)
class Review:
    """One rater's reviewed mask of one automatic unit (``rater``: the tag of the file name)."""

    unit: Unit
    rater: str
    path: Path
    sidecar: dict


def read_sidecar(path: Path) -> dict:
    """The JSON sidecar of a reviewed mask ({} when absent or unreadable, with a warning)."""
    side = path.with_name(path.name[:-len(".nii.gz")] + ".json")
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        LOGGER.warning("%s: unreadable sidecar (%s); the review is matched by its name only", side, exc)
        return {}
    return data if isinstance(data, dict) else {}


def reviewed_combination(sidecar: dict) -> str | None:
    """The combination a review belongs to: the ``desc`` of the automatic file in ``Sources``, else
    ``InputSequences`` (a combination or a list of sequences), else None."""
    sources = sidecar.get("Sources") or []
    for src in [sources] if isinstance(sources, str) else sources:
        desc = io_spec.entities(Path(str(src)).name).get("desc", "")
        if desc and not desc.startswith(PREFIX):
            return desc
    seqs = sidecar.get("InputSequences")
    if isinstance(seqs, (list, tuple)) and seqs:
        return "".join(str(s) for s in seqs)
    return seqs if isinstance(seqs, str) and seqs else None


def find_reviews(units: list[Unit]) -> list[Review]:
    """Every reviewed mask beside the automatic units' outputs, matched to its unit (see the module docstring).

    Reviews whose combination matches no unit of their stem are logged and left out.
    """
    by_stem: dict[tuple[Path, str], list[Unit]] = {}
    for unit in units:
        by_stem.setdefault((unit.paths["epvs_mask"].parent, unit.stem), []).append(unit)
    reviews = []
    for (anat, stem), group in sorted(by_stem.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        for path in sorted(anat.glob(f"{stem}_label-PVS_desc-{PREFIX}*_mask.nii.gz")):
            desc = io_spec.entities(path.name).get("desc", "")
            rater = desc[len(PREFIX):]
            if not rater or path.name != f"{stem}_label-PVS_desc-{desc}_mask.nii.gz":
                continue  # other entities in the name: not a review of this unit
            sidecar = read_sidecar(path)
            combination = reviewed_combination(sidecar)
            if combination:
                match = [u for u in group if u.combination == combination]
            else:
                match = group if len(group) == 1 else []
            if not match:
                LOGGER.warning("%s: reviews combination %s, which has no automatic unit here; left out", path,
                               combination or "(not recorded, and several units share the stem)")
                continue
            reviews.append(Review(match[0], rater, path, sidecar))
    return reviews


def rater_pairs(reviews: list[Review]) -> list[tuple[Review, Review]]:
    """Every pair of raters who reviewed the same unit (ordered by rater tag)."""
    per_unit: dict[str, list[Review]] = {}
    for review in reviews:
        per_unit.setdefault(review.unit.key, []).append(review)
    pairs = []
    for key in sorted(per_unit):
        pairs += list(combinations(sorted(per_unit[key], key=lambda r: r.rater), 2))
    return pairs

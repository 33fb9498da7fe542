"""A model folder's ``model.json`` as a typed, validated :class:`ModelSpec`.

Every consumer of a model (inference, the participant level, training, fine-tuning, benchmarks) reads its
settings from one :class:`ModelSpec` instead of indexing the raw JSON, so that a malformed or tampered model
folder is refused once, with a message naming the file and the problem.

No torch here: a spec (e.g. the served combinations) is read without loading the network.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from .decision import OperatingPoint
from .exclusions import ExclusionParams
from .isolation import IsolationParams

#: Default model folder under ``epvsseg/weights``.
DEFAULT_MODEL = "epvs-unet25d-v11-alone-real"

#: Sequences a 2.5D input can hold, in the order of their channels (the same as :data:`epvsseg.nets.SEQUENCES`).
KNOWN_SEQUENCES: tuple[str, ...] = ("T2w", "T1w", "FLAIR", "SWI")

_REQUIRED = ("model_id", "architecture", "architecture_kwargs", "input_sequences", "context_slices",
             "served_combinations", "voxel_mm", "normalisation", "threshold", "min_cluster_voxels", "sha256")


class WeightsError(RuntimeError):
    """Weights are missing, or their hash does not match ``model.json``."""


class SpecError(WeightsError):
    """A model folder is missing, or its ``model.json`` is malformed; the message names the file."""


def weights_root() -> Path:
    """``epvsseg/weights`` inside the installed package."""
    return Path(str(resources.files("epvsseg") / "weights"))


def available_models() -> list[str]:
    """Model folders shipped in the package (those with a ``model.json``)."""
    root = weights_root()
    return sorted(p.name for p in root.iterdir() if (p / "model.json").is_file()) if root.is_dir() else []


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    """Everything the application needs to know about a model, validated.

    Attributes
    ----------
    model_id : str
        The model's id (its folder name for shipped models).
    folder : Path
        Folder holding ``model.json`` and ``weights.pt``.
    architecture : str
        Registered network name (:func:`epvsseg.nets.build`), e.g. ``unet2d``, or ``ensemble`` (the mean logit
        of several trained networks of one architecture).
    architecture_kwargs : dict
        Keyword arguments of the network (``in_channels``, ``base``, ``depth``; for an ensemble ``member``,
        ``member_kwargs``, ``members``).
    input_sequences : tuple of str
        Sequences of the input channels, in channel order.
    context_slices : int
        Axial slices on each side of the centre slice (2.5D context), >= 0.
    combinations : tuple of tuple of str
        Served input combinations, reference first, in the model's ranking order.
    voxel_mm : float
        Isotropic voxel size the model works at, mm.
    normalisation : str
        Intensity normalisation the model expects (``median-in-mask``).
    threshold : float
        Probability threshold of the operating point, in (0, 1); a voxel is ePVS at ``>=``.
    min_cluster_voxels : int
        Smallest 26-connected cluster kept, voxels (>= 1).
    exclusions : ExclusionParams
        Mimic-exclusion thresholds (``"exclusions"`` in ``model.json``; defaults otherwise).
    sha256 : str
        sha256 of ``weights.pt``.
    peak_threshold : float or None
        Probability a cluster's highest voxel must reach for the cluster to be kept (``"peak_threshold"`` in
        ``model.json``, in [``threshold``, 1)); ``None`` when the model has none.
    flip_tta : bool
        Whether inference averages each prediction with the one on the left-right flipped input (``"flip_tta"``
        in ``model.json``; false when absent). Part of the model: its operating point was chosen so.
    isolation : IsolationParams or None
        The isolation test (:mod:`epvsseg.isolation`: a cluster is kept only when the network finds it with the
        other clusters filled in; ``"isolation"`` in ``model.json``); ``None`` when the model has none.
    finetuned_from : str or None
        Id of the model it was fine-tuned from.
    meta : dict
        The whole ``model.json`` (training record, validation scores), not compared.
    """

    model_id: str
    folder: Path
    architecture: str
    architecture_kwargs: dict
    input_sequences: tuple[str, ...]
    context_slices: int
    combinations: tuple[tuple[str, ...], ...]
    voxel_mm: float
    normalisation: str
    threshold: float
    min_cluster_voxels: int
    exclusions: ExclusionParams
    sha256: str
    peak_threshold: float | None = None
    flip_tta: bool = False
    isolation: IsolationParams | None = None
    finetuned_from: str | None = None
    meta: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def path(self) -> Path:
        """``model.json`` of the folder."""
        return self.folder / "model.json"

    @property
    def weights(self) -> Path:
        """``weights.pt`` of the folder."""
        return self.folder / "weights.pt"

    @property
    def members(self) -> tuple[str, ...]:
        """Model ids of the networks an ``ensemble`` averages (``model.json`` ``members``, else ``member <i>``
        for each of ``architecture_kwargs.members``); empty for a single network."""
        if self.architecture != "ensemble":
            return ()
        listed = self.meta.get("members") or [{} for _ in range(int(self.architecture_kwargs.get("members", 0)))]
        return tuple(str(m.get("model_id", f"member {i}")) for i, m in enumerate(listed))

    @property
    def operating_point(self) -> OperatingPoint:
        """The decision rule of the model (threshold, minimum cluster size, exclusions, peak threshold)."""
        return OperatingPoint(self.threshold, self.min_cluster_voxels, self.exclusions, self.peak_threshold)

    def to_record(self) -> dict[str, Any]:
        """JSON-able provenance the application writes into sidecars."""
        return {"model_id": self.model_id, "weights_sha256": self.sha256, "threshold": self.threshold,
                "min_cluster_voxels": self.min_cluster_voxels, "peak_threshold": self.peak_threshold,
                "flip_tta": self.flip_tta, "exclusions": self.exclusions.to_dict(),
                "isolation": None if self.isolation is None else self.isolation.to_dict(),
                "finetuned_from": self.finetuned_from}

    def verify(self) -> None:
        """Check that ``weights.pt`` exists and its sha256 is :attr:`sha256`.

        Raises
        ------
        SpecError
            Naming ``weights.pt`` and the problem.
        """
        if not self.weights.is_file():
            raise SpecError(f"{self.weights}: no such file (a model folder holds model.json and weights.pt)")
        digest = sha256_file(self.weights)
        if digest != self.sha256:
            raise SpecError(f"{self.weights}: sha256 {digest[:12]}... does not match {self.path.name} "
                            f"({self.sha256[:12]}...)")


def resolve_folder(model: str | Path | None) -> Path:
    """The folder of a model given as ``None`` (default), a folder path, or a shipped model id.

    Raises
    ------
    SpecError
        Neither a folder with ``model.json`` nor a shipped model id.
    """
    if model is None:
        model = DEFAULT_MODEL
    candidate = Path(model)
    if candidate.is_dir():
        if not (candidate / "model.json").is_file():
            raise SpecError(f"{candidate}: no model.json (a model folder holds model.json and weights.pt)")
        return candidate
    shipped = available_models()
    if isinstance(model, str) and model in shipped:
        return weights_root() / model
    raise SpecError(f"no model {str(model)!r}: shipped models are {', '.join(shipped) or 'none'}, or give a folder "
                    "with model.json and weights.pt")


def load_spec(model: str | Path | ModelSpec | None = None, *, verify: bool = True) -> ModelSpec:
    """Read and validate a model folder's ``model.json``.

    Parameters
    ----------
    model : str, Path, ModelSpec or None
        ``None``: the default shipped model (:data:`DEFAULT_MODEL`); a shipped model id (a folder under
        ``epvsseg/weights``); or the path of a folder with ``model.json`` and ``weights.pt``. A
        :class:`ModelSpec` is returned as it is (verified when ``verify``).
    verify : bool
        Also check that ``weights.pt`` exists and has the recorded sha256.

    Returns
    -------
    ModelSpec

    Raises
    ------
    SpecError
        The folder is not found, ``model.json`` is unreadable or inconsistent, or the weights do not match.
    """
    if isinstance(model, ModelSpec):
        spec = model
    else:
        path = resolve_folder(model) / "model.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SpecError(f"{path}: not readable as JSON ({exc})") from None
        spec = spec_from_meta(meta, path)
    if verify:
        spec.verify()
    return spec


def spec_from_meta(meta: Any, path: Path) -> ModelSpec:
    """Validate the parsed ``model.json`` found at ``path`` into a :class:`ModelSpec`.

    Raises
    ------
    SpecError
        ``"<path>: <problem>"`` for the first problem found.
    """
    def fail(problem: str) -> SpecError:
        return SpecError(f"{path}: {problem}")

    if not isinstance(meta, dict):
        raise fail("the top level is not a JSON object")
    if "input_sequences" not in meta and "input_contrasts" in meta:
        meta = {**meta, "input_sequences": meta["input_contrasts"]}  # model folders written before the rename
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise fail(f"missing key(s) {', '.join(missing)}")
    for key in ("model_id", "architecture", "normalisation", "sha256"):
        if not isinstance(meta[key], str) or not meta[key]:
            raise fail(f"{key} {meta[key]!r} is not a non-empty string")
    kwargs = meta["architecture_kwargs"]
    if not isinstance(kwargs, dict):
        raise fail(f"architecture_kwargs {kwargs!r} is not an object")
    sequences = _sequences(meta["input_sequences"], fail)
    context = _integer(meta["context_slices"], "context_slices", 0, fail)
    _check_input_channels(meta["architecture"], kwargs, len(sequences), context, fail)
    threshold = _number(meta["threshold"], "threshold", fail)
    if not 0.0 < threshold < 1.0:
        raise fail(f"threshold {threshold} is not in (0, 1)")
    peak = meta.get("peak_threshold")
    if peak is not None and not threshold <= _number(peak, "peak_threshold", fail) < 1.0:
        raise fail(f"peak_threshold {peak} is not in [threshold {threshold}, 1)")
    flip = meta.get("flip_tta", False)
    if not isinstance(flip, bool):
        raise fail(f"flip_tta {flip!r} is not true or false")
    voxel = _number(meta["voxel_mm"], "voxel_mm", fail)
    if voxel <= 0:
        raise fail(f"voxel_mm {voxel} is not positive")
    finetuned_from = meta.get("finetuned_from")
    if finetuned_from is not None and not isinstance(finetuned_from, str):
        raise fail(f"finetuned_from {finetuned_from!r} is not a string")
    return ModelSpec(
        model_id=meta["model_id"], folder=path.parent, architecture=meta["architecture"],
        architecture_kwargs=dict(kwargs), input_sequences=sequences, context_slices=context,
        combinations=_combinations(meta["served_combinations"], sequences, fail), voxel_mm=voxel,
        normalisation=meta["normalisation"], threshold=threshold,
        min_cluster_voxels=_integer(meta["min_cluster_voxels"], "min_cluster_voxels", 1, fail),
        exclusions=_exclusions(meta.get("exclusions"), fail), sha256=meta["sha256"],
        peak_threshold=None if peak is None else float(peak), flip_tta=flip,
        isolation=_isolation(meta.get("isolation"), fail), finetuned_from=finetuned_from, meta=meta)


def _check_input_channels(architecture: str, kwargs: dict, n_sequences: int, context: int, fail,
                          key: str = "architecture_kwargs") -> None:
    """A 2.5D network (``unet2d``, or an ``ensemble`` of them) must take the channels its inputs make."""
    if architecture == "ensemble":
        member_kwargs = kwargs.get("member_kwargs")
        if not isinstance(member_kwargs, dict):
            raise fail(f"{key}.member_kwargs {member_kwargs!r} is not an object")
        _check_input_channels(kwargs.get("member"), member_kwargs, n_sequences, context, fail,
                              f"{key}.member_kwargs")
    elif architecture == "unet2d":
        expected = n_sequences * (2 * context + 1) + n_sequences
        if kwargs.get("in_channels") != expected:
            raise fail(f"{key}.in_channels {kwargs.get('in_channels')!r} does not match "
                       f"{n_sequences} input sequences with context_slices {context} (expected {expected})")


def parse_combination(text: str) -> tuple[str, ...]:
    """``"T2w+FLAIR"`` -> ``("T2w", "FLAIR")``."""
    return tuple(part.strip() for part in str(text).split("+"))


def _number(value: Any, key: str, fail) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(f"{key} {value!r} is not a finite number")
    return float(value)


def _integer(value: Any, key: str, minimum: int, fail) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(f"{key} {value!r} is not an integer >= {minimum}")
    return int(value)


def _sequences(value: Any, fail) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise fail(f"input_sequences {value!r} is not a non-empty list")
    unknown = [c for c in value if c not in KNOWN_SEQUENCES]
    if unknown:
        raise fail(f"input_sequences {unknown} unknown (known: {', '.join(KNOWN_SEQUENCES)})")
    if len(set(value)) != len(value):
        raise fail(f"input_sequences {value} has duplicates")
    return tuple(value)


def _combinations(value: Any, sequences: tuple[str, ...], fail) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise fail(f"served_combinations {value!r} is not a non-empty list of strings like 'T2w+FLAIR'")
    combinations = []
    for text in value:
        combination = parse_combination(text)
        if any(c not in sequences for c in combination):
            raise fail(f"served combination {text!r} uses a sequence outside input_sequences {list(sequences)}")
        if len(set(combination)) != len(combination):
            raise fail(f"served combination {text!r} repeats a sequence")
        if combination in combinations:
            raise fail(f"served combination {text!r} is listed twice")
        combinations.append(combination)
    return tuple(combinations)


def _known_object(value: Any, key: str, params_type, fail) -> dict:
    """``value`` as an object whose keys are fields of ``params_type`` (else ``fail`` names the problem)."""
    if not isinstance(value, dict):
        raise fail(f"{key} {value!r} is not an object")
    known = {f.name for f in fields(params_type)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise fail(f"{key}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return value


def _exclusions(value: Any, fail) -> ExclusionParams:
    if value is None:
        return ExclusionParams()
    for key, v in _known_object(value, "exclusions", ExclusionParams, fail).items():
        if _number(v, f"exclusions.{key}", fail) <= 0:
            raise fail(f"exclusions.{key} {v!r} is not positive")
    return ExclusionParams(**{k: float(v) for k, v in value.items()})


def _isolation(value: Any, fail) -> IsolationParams | None:
    if value is None:
        return None
    known = _known_object(value, "isolation", IsolationParams, fail)
    words = {k: v for k, v in known.items() if k == "fill"}
    numbers = {k: _number(v, f"isolation.{k}", fail) for k, v in known.items() if k not in words}
    integral = {k: int(v) for k, v in numbers.items() if k in ("window", "margin") and v.is_integer()}
    try:
        return IsolationParams(**{**numbers, **integral, **words})
    except ValueError as err:
        raise fail(str(err)) from None

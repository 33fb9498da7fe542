"""Inference with shipped (or user) weights: load with a checked hash, predict a probability map.

``predict`` runs without nipype or BIDS: images in, probability array out. The model's settings come from its
validated :class:`epvsseg.spec.ModelSpec`; turning the probability into a mask is
:func:`epvsseg.decision.decide`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .nets import SEQUENCES
from .spec import (  # noqa: F401  (re-exported: the model registry's public names)
    DEFAULT_MODEL,
    ModelSpec,
    SpecError,
    WeightsError,
    available_models,
    load_spec,
    sha256_file,
    weights_root,
)

LOGGER = logging.getLogger(__name__)

#: ``amp_dtype`` default of :func:`predict`: bfloat16 autocast on CUDA (float16 without bfloat16), none on the CPU.
AUTO = "auto"


def __getattr__(name: str):
    """``SERVED_COMBINATIONS``: the default model's served combinations, read from its spec."""
    if name == "SERVED_COMBINATIONS":
        return load_spec(verify=False).combinations
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class LoadedModel:
    """A network with its metadata.

    Attributes
    ----------
    net : torch.nn.Module
        The network, in eval mode, on ``device``.
    meta : dict
        The raw ``model.json`` (at least ``context_slices``; ``threshold`` and ``model_id`` when used).
    folder : Path
        The model folder.
    device : str
        ``cpu`` or ``cuda``.
    spec : ModelSpec or None
        The validated spec (set by :func:`load_model`; None for a network under training or evaluation).
    """

    net: Any  # torch.nn.Module
    meta: dict
    folder: Path
    device: str
    spec: ModelSpec | None = None

    @property
    def model_id(self) -> str:
        return self.spec.model_id if self.spec else self.meta["model_id"]

    @property
    def context(self) -> int:
        return self.spec.context_slices if self.spec else int(self.meta["context_slices"])

    @property
    def threshold(self) -> float:
        return self.spec.threshold if self.spec else float(self.meta["threshold"])

    @property
    def flip_tta(self) -> bool:
        """Whether the model averages with the left-right flipped input (``model.json`` ``flip_tta``)."""
        return self.spec.flip_tta if self.spec else bool(self.meta.get("flip_tta", False))

    @property
    def sequences(self) -> tuple[str, ...]:
        """Sequences of the input channels, in channel order."""
        return self.spec.input_sequences if self.spec else SEQUENCES


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when CUDA initialises, else ``cpu`` (with a warning if CUDA was asked for)."""
    import torch

    if device in ("auto", "cuda"):
        try:
            if torch.cuda.is_available():
                torch.zeros(1, device="cuda")
                return "cuda"
        except Exception as exc:  # pragma: no cover - no GPU here
            LOGGER.warning("CUDA failed to initialise (%s); using the CPU", exc)
        if device == "cuda":
            LOGGER.warning("--device cuda requested but CUDA is not available; using the CPU")
    return "cpu"


def load_model(model: str | Path | ModelSpec | None = None, *, device: str = "cpu") -> LoadedModel:
    """Load a model folder (``model.json`` + ``weights.pt``), checking the weights' sha256.

    Parameters
    ----------
    model : str, Path or ModelSpec, optional
        A shipped model id (folder name under ``epvsseg/weights``), a folder path, or a spec
        (:func:`epvsseg.spec.load_spec`); default :data:`DEFAULT_MODEL`.
    device : str
        ``cpu`` or ``cuda`` (already resolved).

    Raises
    ------
    SpecError
        The folder or ``model.json`` is invalid, or the weights' sha256 does not match (names the file).
    """
    import torch

    from .nets import build

    spec = load_spec(model, verify=True)
    try:
        net = build(spec.architecture, **spec.architecture_kwargs)
        state = torch.load(spec.weights, map_location="cpu", weights_only=True)
        net.load_state_dict({k: v.float() for k, v in state.items()})
    except (ValueError, TypeError, RuntimeError) as exc:
        raise SpecError(f"{spec.weights}: does not load into {spec.architecture} "
                        f"{spec.architecture_kwargs} ({exc})") from exc
    net.eval().to(device)
    return LoadedModel(net, spec.meta, spec.folder, device, spec)


def normalise(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Scale an image so that the median inside ``mask`` is 1; 0 outside ``mask``; clipped to [0, 6].

    This is the normalisation every shipped model card names (``median-in-mask``).
    """
    values = data[mask]
    med = float(np.median(values)) if values.size else 0.0
    if med <= 0:
        pos = values[values > 0]
        med = float(np.median(pos)) if pos.size else 1.0
    out = np.where(mask, data / med, 0.0)
    return np.clip(out, 0.0, 6.0).astype(np.float32)


def stack_channels(volumes: Mapping[str, np.ndarray], shape: Sequence[int], context: int,
                   sequences: Sequence[str] = SEQUENCES, slices: Sequence[int] | None = None) -> np.ndarray:
    """Build the 2.5D input of every axial slice (or of the axial ``slices`` given).

    Parameters
    ----------
    volumes : mapping
        Sequence -> normalised ``(I, J, K)`` float32 volume (missing sequences omitted).
    shape : (I, J, K)
    context : int
        Slices on each side of the centre slice.

    slices : sequence of int, optional
        Axial indices to build (default: all ``K``); building a batch at a time keeps memory small.

    Returns
    -------
    ndarray, shape (len(slices), C, I, J)
        ``C = len(sequences) * (2 * context + 1) + len(sequences)``; slices outside the volume are
        edge-replicated; presence channels are constant 0/1 maps.
    """
    ni, nj, nk = shape
    width = 2 * context + 1
    ks = np.arange(nk) if slices is None else np.asarray(slices, int)
    out = np.zeros((ks.size, len(sequences) * width + len(sequences), ni, nj), np.float32)
    for c, name in enumerate(sequences):
        vol = volumes.get(name)
        if vol is None:
            continue
        for o in range(-context, context + 1):
            src = np.clip(ks + o, 0, nk - 1)
            out[:, c * width + o + context] = np.moveaxis(vol[:, :, src], 2, 0)
        out[:, len(sequences) * width + c] = 1.0
    return out


def predict(images: Mapping[str, np.ndarray], mask: np.ndarray, model: LoadedModel, *, batch: int = 8,
            flip_tta: bool | None = None, amp_dtype: Any = AUTO) -> np.ndarray:
    """ePVS probability map for co-registered images on a common ~1 mm RAS+ grid.

    Parameters
    ----------
    images : mapping
        Sequence (``T2w``, ``T1w``, ``FLAIR``, ``SWI``) -> ``(I, J, K)`` array, all on the same grid,
        bias-corrected; only the sequences to use.
    mask : ndarray of bool, shape (I, J, K)
        Brain mask; the prediction is 0 outside it.
    model : LoadedModel
    batch : int
        Axial slices per forward pass. After an out-of-memory error (``torch.OutOfMemoryError``, on any
        device) the batch is halved and retried, down to 1; choose it from the free GPU memory with
        :func:`epvsseg.gpu.batch_for_memory` (as :func:`epvsseg.detect.detect` does).
    flip_tta : bool, optional
        Average with the prediction on the left-right flipped input. None (default): as the model says
        (:attr:`LoadedModel.flip_tta`), so that every caller reads a model's probability map the same way.
    amp_dtype : ``"auto"``, torch.dtype or None
        Autocast precision on ``model.device``'s type: ``"auto"`` is bfloat16 on CUDA (float16 where bfloat16
        is unsupported) and none on the CPU; ``None`` is float32 everywhere; a dtype (e.g. ``torch.bfloat16``)
        is used on any device, the CPU included.

    Returns
    -------
    ndarray of float32, shape (I, J, K), values in [0, 1].
    """
    import torch

    mask = np.asarray(mask, bool)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    norm = {c: normalise(np.asarray(v, np.float32), mask) for c, v in images.items()}
    keep = np.flatnonzero(mask.any(axis=(0, 1)))
    prob = np.zeros(mask.shape, np.float32)
    dtype = _autocast_dtype(model.device, amp_dtype)
    flip_tta = model.flip_tta if flip_tta is None else flip_tta
    start = 0
    with torch.inference_mode():
        while start < keep.size:
            ks = keep[start:start + batch]
            xb = torch.from_numpy(stack_channels(norm, mask.shape, model.context, model.sequences, slices=ks))
            try:
                p = _forward(model, xb, dtype, flip_tta)
            except torch.OutOfMemoryError:
                if batch == 1:
                    raise
                batch = max(1, batch // 2)
                LOGGER.warning("%s out of memory: retrying with %d slices per batch", model.device, batch)
                if str(model.device).startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
            prob[:, :, ks] = np.moveaxis(p, 0, 2)
            start += ks.size
    prob[~mask] = 0.0
    return prob


def _autocast_dtype(device: str, amp_dtype: Any):
    """The autocast dtype :func:`predict` uses on ``device`` (None: no autocast)."""
    import torch

    if isinstance(amp_dtype, str):
        if amp_dtype != AUTO:
            raise ValueError(f"amp_dtype {amp_dtype!r}: give 'auto', None or a torch dtype")
        if not str(device).startswith("cuda"):
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return amp_dtype


def _forward(model: LoadedModel, xb, dtype, flip_tta: bool) -> np.ndarray:
    """Probabilities of one batch ``xb`` ``(B, C, I, J)``: pad, (autocast) forward, sigmoid, crop; ``(B, I, J)``."""
    import torch

    from .nets import pad_to_multiple

    xb, (h, w) = pad_to_multiple(xb.to(model.device), 2 ** model.net.depth)
    # channels-last (NHWC) convolutions: about 1.5x faster on the CPU (oneDNN), same values to float rounding
    xb = xb.contiguous(memory_format=torch.channels_last)
    with torch.autocast(torch.device(model.device).type, dtype=dtype, enabled=dtype is not None):
        logits = model.net(xb)
        if flip_tta:
            logits = 0.5 * (logits + torch.flip(model.net(torch.flip(xb, dims=[2])), dims=[2]))
    return torch.sigmoid(logits.float())[:, 0, :h, :w].cpu().numpy()

"""Inference with shipped (or user) weights: load with a checked hash, predict a probability map.

``predict`` runs without nipype or BIDS: images in, probability array out.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .nets import CONTRASTS

LOGGER = logging.getLogger(__name__)

#: Sequence combinations served by the shipped models, in the seed study's ranking order.
SERVED_COMBINATIONS: tuple[tuple[str, ...], ...] = (
    ("T2w", "FLAIR", "T1w", "SWI"),
    ("T2w", "FLAIR", "T1w"),
    ("T2w", "FLAIR"),
    ("T2w",),
    ("T2w", "T1w"),
    ("T1w", "FLAIR"),
    ("T1w",),
    ("FLAIR",),
)

#: Default model folder under ``epvsseg/weights``.
DEFAULT_MODEL = "epvs-unet25d-v3"


class WeightsError(RuntimeError):
    """Weights are missing, or their hash does not match ``model.json``."""


@dataclass
class LoadedModel:
    """A network with its metadata (``model.json``)."""

    net: Any  # torch.nn.Module
    meta: dict
    folder: Path
    device: str

    @property
    def model_id(self) -> str:
        return self.meta["model_id"]

    @property
    def context(self) -> int:
        return int(self.meta["context_slices"])

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])


def weights_root() -> Path:
    """``epvsseg/weights`` inside the installed package."""
    return Path(str(resources.files("epvsseg") / "weights"))


def available_models() -> list[str]:
    """Model folders shipped in the package (those with a ``model.json``)."""
    root = weights_root()
    return sorted(p.name for p in root.iterdir() if (p / "model.json").is_file()) if root.is_dir() else []


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def load_model(model: str | Path | None = None, *, device: str = "cpu") -> LoadedModel:
    """Load a model folder (``model.json`` + ``weights.pt``), checking the weights' sha256.

    Parameters
    ----------
    model : str or Path, optional
        A shipped model id (folder name under ``epvsseg/weights``) or a folder path;
        default :data:`DEFAULT_MODEL`.
    device : str
        ``cpu`` or ``cuda`` (already resolved).
    """
    import torch

    from .nets import build

    folder = Path(model) if model is not None and Path(model).is_dir() else weights_root() / (model or DEFAULT_MODEL)
    meta_path = folder / "model.json"
    weights = folder / "weights.pt"
    if not meta_path.is_file() or not weights.is_file():
        raise WeightsError(f"{folder}: no model.json/weights.pt (shipped models: {available_models() or 'none'})")
    meta = json.loads(meta_path.read_text())
    digest = sha256_file(weights)
    if digest != meta.get("sha256"):
        raise WeightsError(f"{weights}: sha256 {digest[:12]}... does not match model.json ({str(meta.get('sha256'))[:12]}...)")
    net = build(meta["architecture"], **meta["architecture_kwargs"])
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict({k: v.float() for k, v in state.items()})
    net.eval().to(device)
    return LoadedModel(net, meta, folder, device)


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
                   contrasts: Sequence[str] = CONTRASTS, slices: Sequence[int] | None = None) -> np.ndarray:
    """Build the 2.5D input of every axial slice (or of the axial ``slices`` given).

    Parameters
    ----------
    volumes : mapping
        Contrast -> normalised ``(I, J, K)`` float32 volume (missing contrasts omitted).
    shape : (I, J, K)
    context : int
        Slices on each side of the centre slice.

    slices : sequence of int, optional
        Axial indices to build (default: all ``K``); building a batch at a time keeps memory small.

    Returns
    -------
    ndarray, shape (len(slices), C, I, J)
        ``C = len(contrasts) * (2 * context + 1) + len(contrasts)``; slices outside the volume are
        edge-replicated; presence channels are constant 0/1 maps.
    """
    ni, nj, nk = shape
    width = 2 * context + 1
    ks = np.arange(nk) if slices is None else np.asarray(slices, int)
    out = np.zeros((ks.size, len(contrasts) * width + len(contrasts), ni, nj), np.float32)
    for c, name in enumerate(contrasts):
        vol = volumes.get(name)
        if vol is None:
            continue
        for o in range(-context, context + 1):
            src = np.clip(ks + o, 0, nk - 1)
            out[:, c * width + o + context] = np.moveaxis(vol[:, :, src], 2, 0)
        out[:, len(contrasts) * width + c] = 1.0
    return out


def segment(prob: np.ndarray, model: LoadedModel, *, affine: np.ndarray, brain: np.ndarray,
            flair: np.ndarray | None = None, params=None):
    """Turn a probability map into the ePVS mask as the model card says.

    Threshold at ``model.threshold``, keep 26-connected clusters of at least the model's
    ``min_cluster_voxels``, then exclude lacune-like and (with ``flair``) WMH-like clusters.

    Returns
    -------
    mask : ndarray of bool
    excluded : pandas.DataFrame
        The excluded clusters and why (see :func:`epvsseg.exclusions.exclude_mimics`).
    """
    from .exclusions import ExclusionParams, exclude_mimics
    from .postproc import remove_small_clusters

    kept = remove_small_clusters(prob >= model.threshold, int(model.meta.get("min_cluster_voxels", 2)))
    return exclude_mimics(kept, affine, brain=brain, flair=flair, params=params or ExclusionParams())


def predict(images: Mapping[str, np.ndarray], mask: np.ndarray, model: LoadedModel, *, batch: int = 8,
            flip_tta: bool = False) -> np.ndarray:
    """ePVS probability map for co-registered images on a common ~1 mm RAS+ grid.

    Parameters
    ----------
    images : mapping
        Contrast (``T2w``, ``T1w``, ``FLAIR``, ``SWI``) -> ``(I, J, K)`` array, all on the same grid,
        bias-corrected; only the contrasts to use.
    mask : ndarray of bool, shape (I, J, K)
        Brain mask; the prediction is 0 outside it.
    model : LoadedModel
    batch : int
        Axial slices per forward pass (on CUDA, halved and retried after an out-of-memory error; choose it
        from the free GPU memory with :func:`bids_app.gpu.batch_for_memory` at the application level).
    flip_tta : bool
        Average with the prediction on the left-right flipped input.

    Returns
    -------
    ndarray of float32, shape (I, J, K), values in [0, 1].
    """
    import torch

    from .nets import pad_to_multiple

    mask = np.asarray(mask, bool)
    norm = {c: normalise(np.asarray(v, np.float32), mask) for c, v in images.items()}
    keep = np.flatnonzero(mask.any(axis=(0, 1)))
    prob = np.zeros(mask.shape, np.float32)
    multiple = 2 ** model.net.depth
    cuda = model.device == "cuda"
    amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    start = 0
    with torch.inference_mode():
        while start < keep.size:
            ks = keep[start:start + batch]
            xb = torch.from_numpy(stack_channels(norm, mask.shape, model.context, slices=ks)).to(model.device)
            xb, (h, w) = pad_to_multiple(xb, multiple)
            try:
                with torch.autocast("cuda", dtype=amp, enabled=cuda):
                    logits = model.net(xb)
                    if flip_tta:
                        logits = 0.5 * (logits + torch.flip(model.net(torch.flip(xb, dims=[2])), dims=[2]))
            except torch.cuda.OutOfMemoryError:  # pragma: no cover - needs a GPU
                if batch == 1:
                    raise
                batch = max(1, batch // 2)
                LOGGER.warning("CUDA out of memory: retrying with %d slices per batch", batch)
                torch.cuda.empty_cache()
                continue
            p = torch.sigmoid(logits.float())[:, 0, :h, :w].cpu().numpy()
            prob[:, :, ks] = np.moveaxis(p, 0, 2)
            start += ks.size
    prob[~mask] = 0.0
    return prob

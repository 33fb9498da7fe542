"""GPU sizing: how many axial slices the 2.5D U-Net can take per forward pass, and device descriptions.

Pure arithmetic (no CUDA needed) so that it is tested on any machine; :func:`free_cuda_bytes` and
:func:`describe_device` are the only parts that ask torch about the hardware. :func:`inference_batch` sizes the
batches of a model from its spec (``architecture_kwargs``: input channels, base width, depth).

The memory model (:func:`unet_slice_bytes`) counts the tensors alive at the peak of one
inference forward pass of :class:`epvsseg.nets.UNet2D` (no gradients are kept): the input, its
half-precision copy under autocast, the skip connections of every level, and the working set of
the last decoder block at full resolution (up-sampled map, concatenation, convolution and
normalisation outputs). It matches the peak measured with torch's memory profiler on the CPU
within a few per cent and is never below it (``tests/epvsseg/test_gpu.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .spec import ModelSpec

LOGGER = logging.getLogger(__name__)

#: Memory kept free for cuDNN workspaces, the allocator's fragmentation and other processes, bytes.
RESERVE_BYTES = 768 * 1024**2
#: Share of the remaining free memory that batches may use.
USABLE_FRACTION = 0.8
#: Slices per forward pass on the CPU, or when the free GPU memory is unknown.
CPU_BATCH = 8


def unet_slice_bytes(height: int, width: int, *, in_channels: int, base: int, depth: int,
                     dtype_bytes: int = 2, input_bytes: int = 4) -> int:
    """Peak activation memory of one axial slice in a U-Net inference pass, in bytes.

    Parameters
    ----------
    height, width : int
        Slice size in voxels after padding to a multiple of ``2**depth`` (first two axes of the
        ``(I, J, K)`` volume).
    in_channels, base, depth : int
        The network's ``architecture_kwargs`` (``model.json``): input channels, feature maps at
        full resolution (doubled at each of ``depth`` down-samplings).
    dtype_bytes : int
        Bytes per activation: 2 under fp16/bf16 autocast, 4 in float32.
    input_bytes : int
        Bytes per input value (the input tensor is float32).

    Returns
    -------
    int
        Bytes per slice; a batch of ``n`` slices needs ``n`` times this.

    Notes
    -----
    Elements per voxel: skips ``base * sum_{l<depth} 2**l / 4**l`` plus the full-resolution
    decoder working set ``5 * base``; the input counts ``in_channels`` values at ``input_bytes``
    and, under autocast (``dtype_bytes < 4``), once more at ``dtype_bytes``.
    """
    if min(height, width, in_channels, base) < 1 or depth < 0:
        raise ValueError("height, width, in_channels and base must be positive and depth >= 0")
    skips = sum(base * 2**level / 4**level for level in range(depth))
    activations = skips + 5 * base
    per_voxel = in_channels * input_bytes + activations * dtype_bytes
    if dtype_bytes < input_bytes:
        per_voxel += in_channels * dtype_bytes
    return int(round(height * width * per_voxel))


def batch_for_memory(free_bytes: int, slice_bytes: int, n_slices: int, *, reserve_bytes: int = RESERVE_BYTES,
                     usable_fraction: float = USABLE_FRACTION, max_batch: int = 512) -> int:
    """Slices per forward pass that fit in ``free_bytes`` of device memory.

    Parameters
    ----------
    free_bytes : int
        Free device memory, bytes (``torch.cuda.mem_get_info()[0]``).
    slice_bytes : int
        Memory one slice needs (:func:`unet_slice_bytes`), bytes.
    n_slices : int
        Slices to predict (no point in a larger batch).
    reserve_bytes, usable_fraction : int, float
        Kept aside, then the share of the rest that batches may use.
    max_batch : int
        Upper bound whatever the memory.

    Returns
    -------
    int
        At least 1 (a single slice is always tried; an out-of-memory error then says so).

    Examples
    --------
    >>> batch_for_memory(8 * 1024**3, 20 * 1024**2, 180)
    180
    >>> batch_for_memory(1024**3, 20 * 1024**2, 180)
    10
    """
    if slice_bytes <= 0 or n_slices < 1:
        raise ValueError("slice_bytes and n_slices must be positive")
    usable = max(0.0, (free_bytes - reserve_bytes) * usable_fraction)
    return int(max(1, min(n_slices, max_batch, usable // slice_bytes)))


def spec_slice_bytes(spec: ModelSpec, height: int, width: int, *, dtype_bytes: int = 2) -> int:
    """Peak memory of one axial slice of ``height x width`` voxels for the network of ``spec``, bytes.

    The slice is padded to a multiple of ``2**depth`` (as :func:`epvsseg.infer.predict` does) and
    :func:`unet_slice_bytes` is evaluated with ``in_channels``, ``base`` and ``depth`` from
    ``spec.architecture_kwargs`` (of one member for an ``ensemble``, whose members run one after the other).

    Raises
    ------
    ValueError
        The spec's architecture is not a 2D U-Net with those keyword arguments.
    """
    architecture, kwargs = spec.architecture, spec.architecture_kwargs
    if architecture == "ensemble":  # members run one after the other: one member's activations at a time
        architecture, kwargs = kwargs.get("member"), kwargs.get("member_kwargs") or {}
    missing = [k for k in ("in_channels", "base", "depth") if k not in kwargs]
    if architecture != "unet2d" or missing:
        raise ValueError(f"{spec.path}: no memory model for architecture {spec.architecture!r} {kwargs}")
    multiple = 2 ** int(kwargs["depth"])
    h, w = (-(-int(n) // multiple) * multiple for n in (height, width))
    return unet_slice_bytes(h, w, in_channels=int(kwargs["in_channels"]), base=int(kwargs["base"]),
                            depth=int(kwargs["depth"]), dtype_bytes=dtype_bytes)


def inference_batch(device: str, spec: ModelSpec, shape: Sequence[int]) -> int:
    """Axial slices per forward pass: :data:`CPU_BATCH` on the CPU; on CUDA, as many as fit in free memory.

    Parameters
    ----------
    device : str
        Resolved device, ``cpu`` or ``cuda``.
    spec : ModelSpec
        The model (its ``architecture_kwargs`` size the activations; 16-bit autocast assumed on CUDA).
    shape : (I, J, K)
        The grid the model runs on (after resampling to its voxel size); ``K`` slices at most.

    Returns
    -------
    int
        >= 1.
    """
    if not str(device).startswith("cuda"):
        return CPU_BATCH
    free = free_cuda_bytes()
    if free is None:
        return CPU_BATCH
    batch = batch_for_memory(free, spec_slice_bytes(spec, shape[0], shape[1], dtype_bytes=2), int(shape[2]))
    LOGGER.info("CUDA: %.1f GiB free, %d slices per batch", free / 1024**3, batch)
    return batch


def free_cuda_bytes(device_index: int | None = None) -> int | None:
    """Free memory of a CUDA device in bytes, or None without a usable CUDA device."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, _total = torch.cuda.mem_get_info(device_index)
        return int(free)
    except Exception as exc:  # CUDA present but failing: callers fall back to the CPU
        LOGGER.debug("no CUDA memory information: %s", exc)
        return None


def describe_device(device: str) -> str:
    """A one-line description for reports: ``cuda (NVIDIA H100 80GB HBM3, 79.1 GiB, CUDA 12.6)`` or
    ``cpu (4 threads)``."""
    import torch

    if device.startswith("cuda"):
        try:
            index = torch.device(device).index or 0
            props = torch.cuda.get_device_properties(index)
            return f"cuda ({props.name}, {props.total_memory / 1024**3:.1f} GiB, CUDA {torch.version.cuda})"
        except Exception as exc:  # described as asked even when the query fails
            LOGGER.debug("CUDA device properties unavailable: %s", exc)
            return "cuda"
    return f"cpu ({torch.get_num_threads()} threads)"

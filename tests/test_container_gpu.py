"""GPU sizing and device choice, tested without a GPU.

The memory model of :mod:`bids_app.gpu` is checked against the peak memory that torch's profiler
measures for a real forward pass on the CPU (float32); the CUDA fallback of
``epvsseg.infer.resolve_device`` is checked by making CUDA fail on purpose.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from bids_app.gpu import batch_for_memory, describe_device, free_cuda_bytes, unet_slice_bytes  # noqa: E402


def _measured_peak_bytes(net, batch: int, in_channels: int, height: int, width: int) -> int:
    """Peak of the memory allocated during one inference forward pass (input excluded), bytes."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(batch, in_channels, height, width)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        net(x)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(("base", "depth", "batch"), [(16, 3, 1), (16, 3, 3), (8, 2, 2)])
def test_memory_model_bounds_the_measured_peak(base, depth, batch):
    from epvsseg.nets import UNet2D

    torch.manual_seed(0)
    net = UNet2D(16, base=base, depth=depth).eval()
    h, w = 64, 48
    measured = _measured_peak_bytes(net, batch, 16, h, w)
    estimate = batch * unet_slice_bytes(h, w, in_channels=16, base=base, depth=depth, dtype_bytes=4, input_bytes=0)
    assert measured <= estimate <= 1.3 * measured, (measured, estimate)


def test_slice_bytes_of_the_shipped_model_at_1mm():
    import json
    from importlib import resources

    meta = json.loads((resources.files("epvsseg") / "weights" / "epvs-unet25d-v1" / "model.json").read_text())
    kw = meta["architecture_kwargs"]
    fp16 = unet_slice_bytes(200, 240, **kw, dtype_bytes=2)
    fp32 = unet_slice_bytes(200, 240, **kw, dtype_bytes=4)
    assert fp16 < fp32
    assert 5e6 < fp16 < 5e7  # tens of MB per 1 mm axial slice: a whole brain fits a small GPU
    assert batch_for_memory(6 * 1024**3, fp16, 190) == 190


def test_batch_for_memory():
    mib = 1024**2
    assert batch_for_memory(10_000 * mib, 10 * mib, 180) == 180  # capped by the slices
    assert batch_for_memory(10_000 * mib, 10 * mib, 5000, max_batch=64) == 64
    assert batch_for_memory(768 * mib + 100 * mib, 10 * mib, 180) == 8  # (100 MiB * 0.8) // 10 MiB
    assert batch_for_memory(100 * mib, 10 * mib, 180) == 1  # never 0: one slice is tried
    with pytest.raises(ValueError):
        batch_for_memory(mib, 0, 10)
    with pytest.raises(ValueError):
        unet_slice_bytes(0, 10, in_channels=1, base=1, depth=1)


def test_cuda_failure_falls_back_to_cpu_with_a_warning(monkeypatch, caplog):
    from epvsseg import infer

    def broken_zeros(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        return torch.empty(0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "zeros", broken_zeros)
    with caplog.at_level(logging.WARNING, logger="epvsseg"):
        assert infer.resolve_device("auto") == "cpu"
    assert "CUDA failed to initialise" in caplog.text and "no kernel image" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="epvsseg"):
        assert infer.resolve_device("cuda") == "cpu"
    assert "--device cuda requested but CUDA is not available" in caplog.text


def test_auto_uses_cuda_when_it_initialises(monkeypatch):
    from epvsseg import infer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: torch.empty(0))
    assert infer.resolve_device("auto") == "cuda"
    assert infer.resolve_device("cpu") == "cpu"


def test_no_cuda_here_means_cpu_silently(monkeypatch, caplog):
    from epvsseg import infer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert infer.resolve_device("auto") == "cpu"
    assert not caplog.records
    assert free_cuda_bytes() is None


def test_device_descriptions(monkeypatch):
    assert describe_device("cpu") == f"cpu ({torch.get_num_threads()} threads)"
    fake = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 1024**3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: fake)
    assert describe_device("cuda").startswith("cuda (NVIDIA H100 80GB HBM3, 80.0 GiB, CUDA ")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: (12 * 1024**3, 80 * 1024**3))
    assert free_cuda_bytes() == 12 * 1024**3


def test_inference_batch_follows_free_gpu_memory(monkeypatch):
    """The participant level sizes U-Net batches from the free GPU memory (CPU: a fixed 8)."""
    from types import SimpleNamespace

    from bids_app import gpu, participant

    model = SimpleNamespace(meta={"architecture_kwargs": {"in_channels": 16, "base": 16, "depth": 3}})
    shape = (173, 209, 177)
    assert participant._inference_batch("cpu", model, shape) == 8
    monkeypatch.setattr(gpu, "free_cuda_bytes", lambda *a: None)
    assert participant._inference_batch("cuda", model, shape) == 8
    monkeypatch.setattr(gpu, "free_cuda_bytes", lambda *a: 40 * 1024**3)
    big = participant._inference_batch("cuda", model, shape)
    monkeypatch.setattr(gpu, "free_cuda_bytes", lambda *a: 2 * 1024**3)
    small = participant._inference_batch("cuda", model, shape)
    assert big == shape[2] and 1 <= small < big

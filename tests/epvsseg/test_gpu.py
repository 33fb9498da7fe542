"""GPU sizing, device choice and the GPU code paths of ``predict``, tested without a GPU.

The memory model of :mod:`epvsseg.gpu` is checked against the peak memory that torch's profiler
measures for a real forward pass on the CPU (float32), for the default model's architecture among others; the
CUDA fallback of ``epvsseg.infer.resolve_device`` is checked by making CUDA fail on purpose; the out-of-memory
retry and reduced-precision autocast of ``epvsseg.infer.predict`` run on the CPU.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from epvsseg import gpu, infer  # noqa: E402
from epvsseg.gpu import batch_for_memory, describe_device, free_cuda_bytes, unet_slice_bytes  # noqa: E402
from epvsseg.spec import load_spec  # noqa: E402


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


@pytest.mark.parametrize(("in_channels", "base", "depth", "batch"),
                         [(16, 16, 3, 1), (16, 16, 3, 3), (16, 8, 2, 2), (24, 16, 3, 2)])
def test_memory_model_bounds_the_measured_peak(in_channels, base, depth, batch):
    from epvsseg.nets import UNet2D

    torch.manual_seed(0)
    net = UNet2D(in_channels, base=base, depth=depth).eval()
    h, w = 64, 48
    measured = _measured_peak_bytes(net, batch, in_channels, h, w)
    estimate = batch * unet_slice_bytes(h, w, in_channels=in_channels, base=base, depth=depth, dtype_bytes=4,
                                        input_bytes=0)
    assert measured <= estimate <= 1.3 * measured, (measured, estimate)


def test_slice_bytes_of_the_default_model_at_1mm():
    spec = load_spec()
    assert spec.architecture_kwargs == {"in_channels": 24, "base": 24, "depth": 3}
    fp16 = gpu.spec_slice_bytes(spec, 197, 233, dtype_bytes=2)  # padded to 200 x 240 (multiple of 2**3)
    fp32 = gpu.spec_slice_bytes(spec, 197, 233, dtype_bytes=4)
    assert fp16 == unet_slice_bytes(200, 240, in_channels=24, base=24, depth=3, dtype_bytes=2)
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
    """Detection sizes U-Net batches from the free GPU memory and the model's spec (CPU: a fixed 8)."""
    spec = load_spec()
    shape = (173, 209, 177)
    assert gpu.inference_batch("cpu", spec, shape) == gpu.CPU_BATCH == 8
    monkeypatch.setattr(gpu, "free_cuda_bytes", lambda *a: None)
    assert gpu.inference_batch("cuda", spec, shape) == 8
    monkeypatch.setattr(gpu, "free_cuda_bytes", lambda *a: 40 * 1024**3)
    big = gpu.inference_batch("cuda", spec, shape)
    monkeypatch.setattr(gpu, "free_cuda_bytes", lambda *a: 2 * 1024**3)
    small = gpu.inference_batch("cuda", spec, shape)
    assert big == shape[2] and 1 <= small < big
    per_slice = gpu.spec_slice_bytes(spec, 173, 209)
    assert small == batch_for_memory(2 * 1024**3, per_slice, shape[2])


def test_memory_model_refuses_other_architectures():
    from dataclasses import replace

    with pytest.raises(ValueError, match="no memory model for architecture 'unet3d'"):
        gpu.spec_slice_bytes(replace(load_spec(), architecture="unet3d"), 64, 64)


# ------------------------------------------------------------ predict's GPU paths, on the CPU
def _crop():
    """A real T2w crop (basal ganglia of the demo scan) and its mask."""
    from importlib import resources

    import nibabel as nib
    import numpy as np

    with resources.as_file(resources.files("bids_app.data") / "demo" / "sub-01_T2w.nii.gz") as path:
        data = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
    crop = data[40:120, 50:130, 50:82]
    return crop, crop > np.percentile(crop, 10)


class _OutOfMemoryAbove(torch.nn.Module):
    """The real network, raising CUDA's out-of-memory error for batches of more than ``limit`` slices."""

    def __init__(self, net, limit: int):
        super().__init__()
        self.net, self.limit, self.depth, self.sizes = net, limit, net.depth, []

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: {x.shape[0]} slices (fake)")
        self.sizes.append(x.shape[0])
        return self.net(x)


def test_out_of_memory_halves_the_batch_and_gives_the_same_probabilities(caplog):
    import numpy as np

    crop, mask = _crop()
    model = infer.load_model()
    reference = infer.predict({"T2w": crop}, mask, model, batch=8)
    fake = _OutOfMemoryAbove(model.net, limit=3)
    limited = infer.LoadedModel(fake, model.meta, model.folder, "cpu", model.spec)
    with caplog.at_level(logging.WARNING, logger="epvsseg.infer"):
        prob = infer.predict({"T2w": crop}, mask, limited, batch=8)
    np.testing.assert_allclose(prob, reference, atol=1e-6, rtol=0)
    assert set(fake.sizes) == {2} and sum(fake.sizes) == mask.any(axis=(0, 1)).sum()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["cpu out of memory: retrying with 4 slices per batch",
                        "cpu out of memory: retrying with 2 slices per batch"]
    never = infer.LoadedModel(_OutOfMemoryAbove(model.net, limit=0), model.meta, model.folder, "cpu", model.spec)
    with pytest.raises(torch.OutOfMemoryError, match="1 slices"):
        infer.predict({"T2w": crop[:, :, :4]}, mask[:, :, :4], never, batch=4)


def test_bfloat16_autocast_on_the_cpu_agrees_with_float32():
    """Measured on this crop (torch 2.13 CPU): max |diff| 0.060, mean 8e-5, 19 of ~1,260 mask voxels differ
    (Dice 0.992); the bounds leave about a factor of 2."""
    import numpy as np

    from epvsseg import metrics

    crop, mask = _crop()
    model = infer.load_model()
    fp32 = infer.predict({"T2w": crop}, mask, model)
    assert np.array_equal(fp32, infer.predict({"T2w": crop}, mask, model, amp_dtype=None))  # auto on CPU = none
    bf16 = infer.predict({"T2w": crop}, mask, model, amp_dtype=torch.bfloat16)
    diff = np.abs(bf16 - fp32)
    assert 0 < diff.max() < 0.12 and diff.mean() < 2e-4  # autocast really ran, and stayed close
    t = model.spec.threshold
    assert metrics.dice(bf16 >= t, fp32 >= t) > 0.98
    with pytest.raises(ValueError, match="amp_dtype 'half'"):
        infer.predict({"T2w": crop}, mask, model, amp_dtype="half")


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bfloat16"), (False, "float16")])
def test_auto_precision_on_cuda(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert infer._autocast_dtype("cuda", "auto") == getattr(torch, expected)
    assert infer._autocast_dtype("cpu", "auto") is None
    assert infer._autocast_dtype("cuda", None) is None

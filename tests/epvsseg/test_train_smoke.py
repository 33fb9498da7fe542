"""Training works: a few iterations learn, the operating point is the best one, data and CLI are reproducible.

Everything here runs on tiny crops and networks (the whole file in well under a minute on one core):

* ``sample_batch`` + ``_loss`` + AdamW on three small synthetic crops lower the loss and lift the validation
  Dice of :func:`epvsseg.train.evaluate` far above that of the same network untrained;
* :func:`epvsseg.train.select_operating_point` picks the point that is best by construction on a case whose
  probabilities are known (a fixed "network" that maps intensity to probability);
* :func:`epvsseg.train.generate` renders identical arrays for a seed, in any folder;
* :func:`epvsseg.train.train` on a tiny recipe writes a model folder that the application loads: the spec
  validates, the recorded sha256 is that of ``weights.pt`` and the recorded operating point is the best of the
  recorded grid; ``epvs-bids-train`` (:func:`epvsseg.train.main`) passes its options to that recipe (a run of
  ``main`` itself scores the full 6 x 4 operating-point grid on 112 x 112 x 48 crops: 43 s, too slow here).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from epvsseg import infer, train
from epvsseg.nets import build, n_input_channels
from epvsseg.spec import load_spec

#: Crop seeds of the learning test (rendered by ``generate``: 1726, 2394 and 799 label voxels at 64x64x24).
LEARN_SEEDS = [7003, 7004, 7005]


@pytest.fixture(autouse=True)
def _one_thread():
    """Deterministic and polite on a shared machine: one torch thread, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_cases(tmp_path_factory):
    """Two training crops and one validation crop (64x64x24 voxels, T2w normalised as at inference)."""
    paths = train.generate(LEARN_SEEDS, tmp_path_factory.mktemp("cache"), (64, 64, 24), workers=1)
    cases = [train.load_case(p) for p in paths]
    assert all(c.label.sum() > 500 for c in cases)  # enough ePVS to learn from and to score
    return cases[:2], cases[2:]


def test_a_few_iterations_learn(small_cases):
    train_cases, val_cases = small_cases
    cfg = train.TrainConfig(out="", batch=8, patch=48, context=1, base=8, depth=2, lr=3e-3,
                            combinations=(("T2w",),))
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = build("unet2d", in_channels=n_input_channels(cfg.context), base=cfg.base, depth=cfg.depth)

    def val_dice() -> float:
        return train.evaluate(net, val_cases, [("T2w",)], context=cfg.context, threshold=0.5)["T2w"]["dice"]

    untrained = val_dice()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    losses = []
    for _ in range(100):
        x, y = train.sample_batch(train_cases, rng, cfg)
        assert x.shape == (8, n_input_channels(1), 48, 48) and y.shape == (8, 1, 48, 48)
        loss = train._loss(net(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    trained = val_dice()
    # measured: loss 1.66 over the first 10 iterations -> 0.76 over the last 10; Dice 0.005 -> 0.43
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), losses
    assert untrained < 0.05
    assert trained > 0.25 and trained > untrained + 0.2, (untrained, trained)


# ------------------------------------------------------------------------------------ operating point
class IntensityToProbability(torch.nn.Module):
    """A fixed 'network': logit ``4 (x - 2)`` of the centre T2w channel (probability 0.5 at intensity 2)."""

    depth = 1  # predict pads to a multiple of 2 ** depth

    def __init__(self, context: int):
        super().__init__()
        self.channel = context  # the centre slice of the first sequence (T2w)

    def forward(self, x):
        return 4.0 * (x[:, self.channel:self.channel + 1] - 2.0)


def constructed_case() -> train.Case:
    """A case whose decision at each operating point is known.

    Background intensity 1 (probability 0.02); 8 true ePVS, 4-voxel axial lines at intensity 3 (0.98);
    8 look-alikes, 4-voxel lines at 2.1 (0.60), not in the label; 8 single voxels at 3 (0.98), not in the
    label. So thresholds below 0.6 also keep the look-alikes (precision 0.5), a minimum cluster size of 1
    keeps the single voxels and one of 5 drops everything: the best point is threshold 0.7 with 2 voxels,
    where sensitivity, precision and Dice are all 1.
    """
    shape = (40, 40, 10)
    t2w = np.ones(shape, np.float32)
    label = np.zeros(shape, bool)
    for n in range(8):
        i, j = 4 + 4 * n, 6
        t2w[i, j, 3:7] = 3.0
        label[i, j, 3:7] = True
        t2w[i, 20, 3:7] = 2.1
        t2w[i, 32, 5] = 3.0
    images = {c: np.zeros(shape, np.float32) for c in ("T1w", "FLAIR", "SWI")}
    images["T2w"] = t2w
    return train.Case(images, label, np.zeros(shape, np.uint8), np.ones(shape, bool))


def test_select_operating_point_picks_the_known_best():
    net = IntensityToProbability(context=1)
    (threshold, min_voxels), grid = train.select_operating_point(
        net, [constructed_case()], [("T2w",)], context=1, thresholds=(0.3, 0.5, 0.7, 0.99),
        min_sizes=(1, 2, 5))
    assert (threshold, min_voxels) == (0.7, 2)
    assert set(grid) == {f"{t}/{m}" for t in (0.3, 0.5, 0.7, 0.99) for m in (1, 2, 5)}
    best = grid["0.7/2"]["T2w"]
    assert best["cluster_sensitivity"] == best["cluster_precision"] == pytest.approx(1.0)
    assert best["dice"] == pytest.approx(1.0)
    assert grid["0.5/2"]["T2w"]["cluster_precision"] == pytest.approx(0.5)  # the look-alikes pass 0.5
    assert grid["0.7/1"]["T2w"]["cluster_precision"] == pytest.approx(0.5)  # the single voxels pass size 1
    assert grid["0.7/5"]["T2w"]["cluster_sensitivity"] == 0.0
    assert grid["0.99/2"]["T2w"]["cluster_sensitivity"] == 0.0


# --------------------------------------------------------------------------------------- reproducibility
def _arrays(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_generate_is_deterministic(tmp_path):
    (a,) = train.generate([424242], tmp_path / "a", (48, 48, 16), workers=1)
    (b, other) = train.generate([424242, 424243], tmp_path / "b", (48, 48, 16), workers=1)
    first, again, different = _arrays(a), _arrays(b), _arrays(other)
    assert set(first) >= {"img_T2w", "img_T1w", "img_FLAIR", "img_SWI", "label", "mask", "params"}
    for key in first:
        assert np.array_equal(first[key], again[key]), key
    assert not np.array_equal(first["img_T2w"], different["img_T2w"])
    mtime = a.stat().st_mtime_ns
    assert train.generate([424242], tmp_path / "a", (48, 48, 16), workers=1) == [a]  # cached, not re-rendered
    assert a.stat().st_mtime_ns == mtime


def test_mixed_generator_alternates_the_two_and_keeps_each_generators_cache(tmp_path):
    seeds = [11, 12, 13]
    paths = train.generate(seeds, tmp_path, (48, 48, 16), workers=1, generator="mixed", anatomies=("icbm2009a",))
    assert [p.name for p in paths] == ["case-11.npz", "rcase-v2-12.npz", "case-13.npz"]
    (old,) = train.generate([12], tmp_path, (48, 48, 16), workers=1, generator="randomised",
                            anatomies=("icbm2009a",), randomised_version=1)  # v5's data: its own file
    assert old.name == "rcase-v1-12.npz" and json.loads(str(_arrays(old)["params"]))["version"] == 1
    params = [json.loads(str(_arrays(p)["params"])) for p in paths]
    assert params[1]["generator"] == "randomised" and "generator" not in params[0]
    # the same seeds through each generator alone give the same files
    (v3,) = train.generate([11], tmp_path / "v3", (48, 48, 16), workers=1)
    (rnd,) = train.generate([12], tmp_path / "rnd", (48, 48, 16), workers=1, generator="randomised",
                            anatomies=("icbm2009a",))
    assert np.array_equal(_arrays(v3)["img_T2w"], _arrays(paths[0])["img_T2w"])
    assert np.array_equal(_arrays(rnd)["img_T2w"], _arrays(paths[1])["img_T2w"])
    with pytest.raises(ValueError, match="unknown generator"):
        train.generate(seeds, tmp_path, (48, 48, 16), workers=1, generator="v5")


# ------------------------------------------------------------------------------------- the recipe and CLI
def test_train_writes_a_model_the_application_loads(tmp_path):
    cfg = train.TrainConfig(out=str(tmp_path / "epvs-tiny"), seed=5, n_train=2, n_val=1, crop_vox=(48, 48, 16),
                            iterations=4, val_every=2, batch=2, patch=32, base=4, depth=2, context=1, threads=1,
                            workers=1, cache_dir=str(tmp_path / "cache"), thresholds=(0.5, 0.9), min_sizes=(2, 3),
                            combinations=(("T2w",), ("T1w",)), device="auto")
    meta = train.train(cfg)
    out = tmp_path / "epvs-tiny"
    assert json.loads((out / "model.json").read_text()) == json.loads(json.dumps(meta))
    spec = load_spec(out, verify=True)  # validates model.json and checks the weights' sha256
    assert spec.model_id == "epvs-tiny" and spec.context_slices == 1
    assert spec.combinations == (("T2w",), ("T1w",))
    assert infer.sha256_file(out / "weights.pt") == meta["sha256"] == spec.sha256
    assert spec.architecture_kwargs == {"in_channels": n_input_channels(1), "base": 4, "depth": 2}
    # the recorded operating point is the best of the recorded grid, whose scores are the recorded validation
    selection = meta["training"]["operating_point_selection"]
    assert set(selection) == {"0.5/2", "0.5/3", "0.9/2", "0.9/3"}
    best = max(selection, key=lambda p: train._score(selection[p]))
    assert best == f"{spec.threshold}/{spec.min_cluster_voxels}"
    assert meta["validation"] == selection[best]
    assert [h["iteration"] for h in meta["training"]["history"]] == [2, 4]
    assert {h["device"] for h in meta["training"]["history"]} == {"cpu"}  # "auto" without a GPU
    assert meta["training"]["seeds"] == np.random.default_rng(5).integers(0, 2**31 - 1, size=3).tolist()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        f"case-{s}.npz" for s in meta["training"]["seeds"])
    # the application loads it and predicts
    model = infer.load_model(out)
    vol = np.ones((40, 40, 6), np.float32)
    prob = infer.predict({"T2w": vol}, np.ones(vol.shape, bool), model)
    assert prob.shape == vol.shape and np.isfinite(prob).all()


def test_main_passes_the_command_line_to_the_recipe(tmp_path, monkeypatch, capsys):
    """``epvs-bids-train`` maps every option onto :class:`TrainConfig` and prints the validation scores."""
    seen = []

    def fake_train(cfg):
        seen.append(cfg)
        return {"validation": {"T2w": {"dice": 0.5}}}

    monkeypatch.setattr(train, "train", fake_train)
    code = train.main(["--out", str(tmp_path / "m"), "--seed", "5", "--n-train", "2", "--n-val", "1",
                       "--iterations", "4", "--lr", "0.01", "--pos-fraction", "0.5", "--init", "epvs-unet25d-v2",
                       "--cache-dir", str(tmp_path / "cache"), "--t2w-fraction", "0.3"])
    assert code == 0
    (cfg,) = seen
    assert cfg == train.TrainConfig(out=str(tmp_path / "m"), seed=5, n_train=2, n_val=1, iterations=4, lr=0.01,
                                    pos_fraction=0.5, init="epvs-unet25d-v2", cache_dir=str(tmp_path / "cache"),
                                    t2w_fraction=0.3)
    assert json.loads(capsys.readouterr().out) == {"T2w": {"dice": 0.5}}

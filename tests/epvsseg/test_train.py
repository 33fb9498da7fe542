"""Training recipe helpers: combination sampling and the warm starts that widen the context or the network."""

from __future__ import annotations

import numpy as np
import pytest

from epvsseg import infer
from epvsseg.nets import build, n_input_channels
from epvsseg.train import TrainConfig, _initial_network, combination_weights, widen_base, widen_context


def test_default_training_combinations_are_the_default_models():
    assert TrainConfig(out="").combinations == infer.load_spec().combinations


def test_combination_weights_favour_t2w_as_configured():
    cfg = TrainConfig(out="", t2w_fraction=0.3)
    w = combination_weights(cfg)
    assert w.sum() == pytest.approx(1.0)
    assert w[cfg.combinations.index(("T2w",))] == pytest.approx(0.3)
    others = np.delete(w, cfg.combinations.index(("T2w",)))
    assert np.allclose(others, 0.7 / (len(cfg.combinations) - 1))
    assert np.allclose(combination_weights(TrainConfig(out="")), 1 / len(cfg.combinations))


def test_widened_context_computes_what_the_narrow_model_did():
    base = infer.load_model(infer.DEFAULT_MODEL)
    state = {k: v.float() if v.is_floating_point() else v for k, v in base.net.state_dict().items()}
    wide_ctx = base.context + 1
    net = build(base.spec.architecture,
                **{**base.spec.architecture_kwargs, "in_channels": n_input_channels(wide_ctx)})
    net.load_state_dict(widen_context(state, base.context, wide_ctx))
    _assert_same_predictions(base, net, wide_ctx, seed=0)
    with pytest.raises(ValueError, match="narrow"):
        widen_context(state, 2, 1)


def test_widened_network_computes_what_the_narrow_model_did():
    narrow = "epvs-unet25d-v3"  # 16 feature maps, widened to 24 as v11 was made from v10
    base = infer.load_model(narrow)
    old = base.spec.architecture_kwargs["base"]
    cfg = TrainConfig(out="", init=narrow, context=base.context, base=old + 8)
    net, kwargs, init = _initial_network(cfg)
    assert kwargs["base"] == old + 8 and init["base"] == old
    assert sum(p.numel() for p in net.parameters()) > 2 * sum(p.numel() for p in base.net.parameters())
    _assert_same_predictions(base, net, base.context, seed=1)
    # the new channels are live: their fresh weights from the input are kept, not zeroed
    first = next(k for k, v in net.state_dict().items() if v.ndim == 4)
    assert net.state_dict()[first][old:].abs().sum() > 0
    with pytest.raises(ValueError, match="narrow"):
        widen_base(base.net.state_dict(), build("unet2d", **{**kwargs, "base": old - 8}).state_dict(), old, old - 8)
    with pytest.raises(ValueError, match="does not fit"):
        _initial_network(TrainConfig(out="", init=narrow, context=base.context, base=old - 8))


def _assert_same_predictions(base, net, context: int, seed: int):
    """``net`` (a warm-started network with ``context`` slices each side) predicts what ``base`` does."""
    wide = infer.LoadedModel(net.eval(), {"context_slices": context}, base.folder, "cpu")  # no spec: a new net
    rng = np.random.default_rng(seed)
    vol = rng.gamma(4.0, 0.25, (40, 48, 10)).astype(np.float32)
    vol[18:21, 20:23, :] = 4.0  # a bright vertical tube, so the output is not trivially zero
    mask = np.ones(vol.shape, bool)
    a = infer.predict({"T2w": vol}, mask, base)
    b = infer.predict({"T2w": vol}, mask, wide)
    assert a.max() > 0.1
    assert np.abs(a - b).max() < 1e-4

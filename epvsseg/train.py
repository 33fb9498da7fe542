"""Train the 2.5D multi-channel ePVS U-Net on synthetic data, reproducibly.

``python -m epvsseg.train --out epvsseg/weights/epvs-unet25d-v2`` renders seeded synthetic
cases with :mod:`epvsseg.synth` (the parameters of every case are saved), trains one
network for every served sequence combination with modality dropout, keeps the
checkpoint with the best validation score, and writes ``weights.pt``, ``model.json``
(architecture, input sequences, voxel size, normalisation, threshold, sha256,
commit) and ``MODEL_CARD.md``.

Everything random flows from ``--seed``: case parameters, batch sampling, the
combination drawn per sample, augmentation, and torch's initialisation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import cycle
from pathlib import Path

import numpy as np

from .decision import OperatingPoint, decide
from .exclusions import ExclusionParams
from .infer import normalise, stack_channels
from .nets import SEQUENCES, n_input_channels
from .spec import load_spec

LOGGER = logging.getLogger(__name__)

#: Regions the training crops are centred on, and how often.
ROI_WEIGHTS = {"basal_ganglia": 0.35, "centrum_semiovale": 0.35, "random": 0.30}


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe (saved in ``model.json`` and the model card)."""

    out: str
    seed: int = 20261121
    n_train: int = 160
    n_val: int = 24
    crop_vox: tuple[int, int, int] = (112, 112, 48)
    iterations: int = 4000
    batch: int = 12
    patch: int = 96
    lr: float = 2e-3
    base: int = 16
    depth: int = 3
    context: int = 1
    pos_fraction: float = 0.7
    val_every: int = 500
    threads: int = 2
    workers: int = 2
    cache_dir: str = "work/synth-cache"
    init: str = ""
    t2w_fraction: float = 0.125
    thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    min_sizes: tuple[int, ...] = (2, 3, 4, 5)
    #: Peak thresholds tried above each threshold (:func:`operating_points`); empty: no peak test.
    peaks: tuple[float, ...] = ()
    combinations: tuple[tuple[str, ...], ...] = field(default_factory=lambda: load_spec(verify=False).combinations)
    #: Data generator: ``"v3"`` (:func:`epvsseg.synth.render` from the ICBM average; the shipped models),
    #: ``"randomised"`` (:mod:`epvsseg.synth.randomised`: real anatomies, domain randomisation) or ``"mixed"``
    #: (the two in turn, seed by seed, for training and validation cases alike).
    generator: str = "v3"
    #: Comma-separated anatomies of the randomised generator (empty: every shipped one).
    anatomies: str = ""
    #: Parameter format of the randomised generator (:data:`epvsseg.synth.randomised.RANDOMISED_VERSIONS`): 2 adds
    #: WMH and lacunes; 1 is v5's data (a ``model.json`` without this key was trained on version 1).
    randomised_version: int = 2
    #: Where the network trains: ``cpu``, ``cuda`` or ``auto`` (:func:`epvsseg.infer.resolve_device`); the
    #: cases are always rendered on the CPU.
    device: str = "cpu"


# ------------------------------------------------------------------- data
GENERATORS: tuple[str, ...] = ("v3", "randomised", "mixed")


def _render_randomised(rng: np.random.Generator, roi: str, crop, anatomies: tuple[str, ...], version: int):
    """One domain-randomised case (:mod:`epvsseg.synth.randomised`) on an anatomy drawn from ``anatomies``."""
    from .synth import label_maps, randomised

    names = tuple(anatomies) or label_maps.anatomy_names()
    anatomy = str(names[int(rng.integers(0, len(names)))])
    params = randomised.sample_randomised(rng, anatomy, sequences=SEQUENCES, roi=roi, shape_vox=tuple(crop),
                                          version=version)
    return randomised.render_randomised(params)


def _render_case(args) -> str:
    seed, path, crop, *rest = args
    generator, anatomies, version = (rest[0], tuple(rest[1]), int(rest[2])) if rest else ("v3", (), 0)
    from . import synth

    path = Path(path)
    if path.exists():
        return str(path)
    rng = np.random.default_rng(seed)
    roi = rng.choice(list(ROI_WEIGHTS), p=list(ROI_WEIGHTS.values()))
    if generator == "randomised":
        case = _render_randomised(rng, str(roi), crop, anatomies, version)
    else:
        params = synth.sample_params(rng, sequences=SEQUENCES, roi=str(roi), shape_vox=tuple(crop))
        case = synth.render(params, synth.load_priors())
    mask = brain_mask_of(case)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp, **{f"img_{c}": case.images[c].astype(np.float16) for c in SEQUENCES},
        label=case.label.astype(np.uint8), mimics=case.mimics.astype(np.uint8), mask=mask,
        params=json.dumps(case.params),
    )
    os.replace(tmp, path)
    return str(path)


def brain_mask_of(case) -> np.ndarray:
    """Brain-tissue mask of a synthetic case (where the anatomy has brain tissue)."""
    mask = getattr(case, "brain", None)
    if mask is None:
        mask = case.images["T1w"] > 0.05 * float(np.percentile(case.images["T1w"], 99))
    return np.asarray(mask, bool)


def anatomy_list(anatomies: str | list[str]) -> tuple[str, ...]:
    """The anatomy names of ``TrainConfig.anatomies`` (comma-separated, or a list as a ``model.json`` may hold),
    stripped, empty ones left out (empty: every shipped anatomy, as :func:`generate` takes it)."""
    names = anatomies.split(",") if isinstance(anatomies, str) else anatomies
    return tuple(n.strip() for n in names if n.strip())


def generate(seeds: list[int], folder: Path, crop, workers: int, *, generator: str = "v3",
             anatomies: tuple[str, ...] = (),
             randomised_version: int = TrainConfig.randomised_version) -> list[Path]:
    """Render (or reuse) one cached ``.npz`` per seed, in parallel.

    ``generator`` is ``"v3"`` (files ``case-<seed>.npz``), ``"randomised"`` (``rcase-v<version>-<seed>.npz``,
    on the ``anatomies`` named, default all shipped ones, in the generator's ``randomised_version``) or
    ``"mixed"`` (v3 for even positions, randomised for odd).
    """
    if generator not in GENERATORS:
        raise ValueError(f"unknown generator {generator!r}; expected one of {GENERATORS}")
    folder.mkdir(parents=True, exist_ok=True)
    kinds = cycle({"v3": ["v3"], "randomised": ["randomised"], "mixed": ["v3", "randomised"]}[generator])
    jobs = [(s, str(folder / f"case-{s}.npz"), tuple(crop)) if kind == "v3" else
            (s, str(folder / f"rcase-v{randomised_version}-{s}.npz"), tuple(crop), kind, tuple(anatomies),
             randomised_version)
            for s, kind in zip(seeds, kinds)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            return [Path(p) for p in pool.map(_render_case, jobs)]
    return [Path(_render_case(j)) for j in jobs]


@dataclass
class Case:
    """A labelled case, normalised as at inference.

    Attributes
    ----------
    images : dict
        Sequence -> ``(I, J, K)`` float32 image normalised by :func:`epvsseg.infer.normalise`.
    label : ndarray of bool, shape (I, J, K)
        True ePVS.
    mimics : ndarray of uint8, shape (I, J, K)
        Synthetic mimic labels (1 WMH, 2 lacune; zeros for real cases).
    mask : ndarray of bool, shape (I, J, K)
        Brain mask.
    affine : ndarray, shape (4, 4)
        Voxel-to-mm affine (the mimic exclusions of :func:`epvsseg.decision.decide` measure in mm); the
        synthetic crops are 1 mm isotropic, hence the identity by default.
    """

    images: dict[str, np.ndarray]
    label: np.ndarray
    mimics: np.ndarray
    mask: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))


def load_case(path: Path) -> Case:
    with np.load(path) as z:
        mask = z["mask"].astype(bool)
        images = {c: normalise(z[f"img_{c}"].astype(np.float32), mask) for c in SEQUENCES}
        return Case(images, z["label"].astype(bool), z["mimics"], mask)


def sample_batch(cases: list[Case], rng: np.random.Generator, cfg: TrainConfig):
    """A batch of 2.5D patches with modality dropout and augmentation.

    Returns
    -------
    x : ndarray, shape (B, C, P, P)
    y : ndarray, shape (B, 1, P, P)
    """
    n_ch = n_input_channels(cfg.context)
    x = np.zeros((cfg.batch, n_ch, cfg.patch, cfg.patch), np.float32)
    y = np.zeros((cfg.batch, 1, cfg.patch, cfg.patch), np.float32)
    for b in range(cfg.batch):
        case = cases[rng.integers(len(cases))]
        ni, nj, nk = case.label.shape
        if rng.random() < cfg.pos_fraction and case.label.any():
            pos = np.argwhere(case.label)
            ci, cj, k = pos[rng.integers(len(pos))]
            i0 = int(np.clip(ci - rng.integers(8, cfg.patch - 8), 0, ni - cfg.patch))
            j0 = int(np.clip(cj - rng.integers(8, cfg.patch - 8), 0, nj - cfg.patch))
        else:
            k = rng.integers(nk)
            i0 = rng.integers(0, ni - cfg.patch + 1)
            j0 = rng.integers(0, nj - cfg.patch + 1)
        combination = cfg.combinations[rng.choice(len(cfg.combinations), p=combination_weights(cfg))]
        vols = {}
        for c in combination:
            v = case.images[c][i0:i0 + cfg.patch, j0:j0 + cfg.patch]
            gamma = float(np.exp(rng.normal(0, 0.15)))
            scale = float(np.exp(rng.normal(0, 0.1)))
            vols[c] = np.clip(scale * np.power(v, gamma), 0, 6)
        ks = np.clip(np.arange(k - cfg.context, k + cfg.context + 1), 0, nk - 1)
        sub = {c: v[:, :, ks] for c, v in vols.items()}
        xs = stack_channels(sub, (cfg.patch, cfg.patch, len(ks)), cfg.context)[cfg.context]
        ys = case.label[i0:i0 + cfg.patch, j0:j0 + cfg.patch, k].astype(np.float32)
        if rng.random() < 0.5:  # left-right flip (axis i is R-L)
            xs, ys = xs[:, ::-1], ys[::-1]
        if rng.random() < 0.5:
            xs, ys = xs[:, :, ::-1], ys[:, ::-1]
        x[b], y[b, 0] = xs, ys
    return x, y


def combination_weights(cfg: TrainConfig) -> np.ndarray:
    """Probability of drawing each of ``cfg.combinations`` for a training sample.

    T2w alone, the most common research input and the seed study's best single sequence, is drawn with
    probability ``cfg.t2w_fraction``; the other combinations share the rest equally.
    """
    n = len(cfg.combinations)
    if ("T2w",) not in cfg.combinations or n == 1:
        return np.full(n, 1.0 / n)
    w = np.full(n, (1.0 - cfg.t2w_fraction) / (n - 1))
    w[cfg.combinations.index(("T2w",))] = cfg.t2w_fraction
    return w


def widen_context(state: dict, old_context: int, new_context: int, n_sequences: int = len(SEQUENCES)) -> dict:
    """Map a 2.5D model's weights to a wider slice context (warm start of a ``context`` change).

    Only the first convolution sees the slice channels: its kernel for offset ``o`` of sequence ``c`` moves to
    the new position of ``(c, o)``; the new outer offsets start at zero, so the widened network computes
    exactly what the old one did until training changes it. Presence channels move to the new end.
    """
    if new_context < old_context:
        raise ValueError(f"cannot narrow the context from {old_context} to {new_context}")
    key = next(k for k, v in state.items() if v.ndim == 4)  # first conv weight: (out, in, kh, kw)
    w = state[key]
    wo, wn = 2 * old_context + 1, 2 * new_context + 1
    new = w.new_zeros((w.shape[0], n_sequences * wn + n_sequences, *w.shape[2:]))
    for c in range(n_sequences):
        for o in range(-old_context, old_context + 1):
            new[:, c * wn + o + new_context] = w[:, c * wo + o + old_context]
        new[:, n_sequences * wn + c] = w[:, n_sequences * wo + c]
    return {**state, key: new}


def widen_base(state: dict, fresh: dict, old_base: int, new_base: int) -> dict:
    """Map a U-Net's weights to more feature maps per level (warm start of a ``base`` change).

    ``fresh`` is the wider network's own initial state. Every old channel keeps its weights and its place (in a
    decoder's concatenated input the skip half moves behind the wider up-sampled half); the new channels keep
    their fresh weights from every input, and every weight *from* a new channel *into* an old one starts at
    zero, so the widened network computes exactly what the old one did until training changes it (batch norm
    is per channel, so the old channels' statistics are untouched).
    """
    if new_base < old_base:
        raise ValueError(f"cannot narrow the network from base {old_base} to {new_base}")
    ratio = new_base / old_base
    out = {}
    for key, new in fresh.items():
        old = state[key]
        if old.shape == new.shape:
            out[key] = old
            continue
        places = [_channel_places(key, dim, old.shape[dim], new.shape[dim], ratio) for dim in range(old.ndim)]
        t = new.clone()
        if old.ndim == 4:  # a weight: silence what flows from new channels into old ones
            o, i = (1, 0) if key.startswith("up.") else (0, 1)  # ConvTranspose2d weights are (in, out, kh, kw)
            new_in = np.setdiff1d(np.arange(new.shape[i]), places[i])
            t[np.ix_(*((places[o], new_in) if o == 0 else (new_in, places[o])))] = 0
        t[np.ix_(*places)] = old
        out[key] = t
    return out


def _channel_places(key: str, dim: int, n_old: int, n_new: int, ratio: float) -> np.ndarray:
    """Where the old channels of axis ``dim`` of weight ``key`` sit in the widened network."""
    if n_old == n_new:
        return np.arange(n_old)
    if key.startswith("dec.") and key.endswith(".0.weight") and dim == 1:  # input: [up-sampled, skip]
        half_old, half_new = n_old // 2, n_new // 2
        return np.concatenate([np.arange(half_old), half_new + np.arange(half_old)])
    if round(n_old * ratio) != n_new:
        raise ValueError(f"{key}: axis {dim} has {n_old} -> {n_new} channels, not {ratio:g} times as many")
    return np.arange(n_old)


# --------------------------------------------------------------- training
def _loss(logits, target):
    import torch
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(3.0, device=logits.device))
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    dice = 1 - (2 * inter + 1) / (prob.sum() + target.sum() + 1)
    return bce + dice


def score_grid(net, cases: list[Case], combinations, *, context: int, points: list[tuple],
               exclusions: ExclusionParams = ExclusionParams(), flip_tta: bool = False) -> dict[tuple, dict]:
    """Voxel Dice and pooled cluster rates per combination at several operating points.

    One prediction per case and combination, turned into a mask by :func:`epvsseg.decision.decide` (the rule the
    application applies, mimic exclusions included) at every ``(threshold, min_cluster_voxels)`` of ``points``.
    The WMH test sees the case's FLAIR when the combination includes FLAIR.

    Parameters
    ----------
    net : torch.nn.Module
        2.5D network (put in eval mode, and back in train mode on return).
    cases : list of Case
    combinations : sequence of tuple of str
        Input combinations to score.
    context : int
        The network's 2.5D context (slices on each side).
    points : list of tuple
        ``(threshold, min_cluster_voxels)`` pairs or ``(threshold, min_cluster_voxels, peak_threshold)``
        triples (:class:`epvsseg.decision.OperatingPoint`).
    exclusions : ExclusionParams
        Mimic-exclusion thresholds (a model's ``spec.exclusions``).
    flip_tta : bool
        Average each prediction with the one on the left-right flipped input (:func:`epvsseg.infer.predict`).

    Returns
    -------
    dict
        ``{point: {"<combination>": {"dice", "cluster_sensitivity", "cluster_precision", "cluster_f1"}}}``.
    """
    from .infer import LoadedModel, predict
    from .metrics import cluster_agreement, dice, pooled_rates

    device = next((p.device.type for p in net.parameters()), "cpu")
    model = LoadedModel(net, {"context_slices": context, "model_id": "val"}, Path("."), device)
    rules = {p: OperatingPoint(p[0], p[1], exclusions, *p[2:]) for p in points}
    net.eval()
    out: dict = {p: {} for p in points}
    for combination in combinations:
        dices: dict = {p: [] for p in points}
        agreements: dict = {p: [] for p in points}
        for case in cases:
            prob = predict({c: case.images[c] for c in combination}, case.mask, model, flip_tta=flip_tta)
            flair = case.images.get("FLAIR") if "FLAIR" in combination else None
            for p, rule in rules.items():
                pred = decide(prob, rule, affine=case.affine, brain=case.mask, flair=flair).mask
                dices[p].append(dice(pred, case.label))
                agreements[p].append(cluster_agreement(pred, case.label))
        for p in points:
            sens, prec, f1 = pooled_rates(agreements[p])
            out[p]["+".join(combination)] = {"dice": float(np.mean(dices[p])), "cluster_sensitivity": sens,
                                       "cluster_precision": prec, "cluster_f1": f1}
    net.train()
    return out


def evaluate(net, cases: list[Case], combinations, *, context: int, threshold: float = 0.5,
             min_cluster_voxels: int = 2, thresholds: tuple[float, ...] | None = None,
             exclusions: ExclusionParams = ExclusionParams(), peak_threshold: float | None = None,
             flip_tta: bool = False) -> dict:
    """Voxel Dice and cluster F1 per combination on whole validation cases (through :func:`decide`).

    With ``thresholds``, returns ``{threshold: {combination: scores}}`` (one prediction per case and
    combination, thresholded several ways); otherwise ``{combination: scores}`` at ``threshold``.
    ``peak_threshold`` (single threshold only): the operating point's peak test; ``flip_tta``: predictions
    averaged with the flipped input (:func:`score_grid`).
    """
    ths = tuple(thresholds) if thresholds else (threshold,)
    if thresholds and peak_threshold is not None:
        raise ValueError("evaluate: a peak threshold goes with a single threshold, not a list")
    peak = () if peak_threshold is None else (peak_threshold,)
    grid = score_grid(net, cases, combinations, context=context,
                      points=[(t, min_cluster_voxels, *peak) for t in ths], exclusions=exclusions, flip_tta=flip_tta)
    out = {t: grid[(t, min_cluster_voxels, *peak)] for t in ths}
    return out if thresholds else out[threshold]


def operating_points(thresholds, min_sizes, peaks=()) -> list[tuple]:
    """The grid of a model's operating point: every ``(threshold, min voxels)``, then every
    ``(threshold, min voxels, peak)`` with a peak of ``peaks`` above the threshold."""
    plain = [(float(t), int(m)) for t in thresholds for m in min_sizes]
    return plain + [(t, m, float(p)) for t, m in plain for p in peaks if p > t]


def point_key(point: tuple) -> str:
    """``"<threshold>/<min voxels>[/<peak>]"``: a point's key in ``operating_point_selection``."""
    return "/".join(str(v) for v in point)


def select_operating_point(net, cases: list[Case], combinations, *, context: int, thresholds: tuple[float, ...],
                           min_sizes: tuple[int, ...], exclusions: ExclusionParams = ExclusionParams(),
                           peaks: tuple[float, ...] = ()) -> tuple[tuple, dict]:
    """The point of :func:`operating_points` with the best :func:`_score` on ``cases``, and the whole grid.

    Every point is scored through :func:`epvsseg.decision.decide` with ``exclusions``, as the application
    decides. The grid is returned as ``{point_key: {combination: scores}}`` (JSON-ready); ties go to the first
    point in grid order (without a peak test before with one).
    """
    grid = score_grid(net, cases, combinations, context=context,
                      points=operating_points(thresholds, min_sizes, peaks), exclusions=exclusions)
    best = max(grid, key=lambda p: _score(grid[p]))
    return best, {point_key(p): v for p, v in grid.items()}


def _score(scores: dict) -> float:
    """Model-selection score: mean over combinations of cluster F1 + voxel Dice."""
    return float(np.mean([v["cluster_f1"] + v["dice"] for v in scores.values()]))


def synth_source_hash() -> str:
    """sha256 over the source files of :mod:`epvsseg.synth` (ties weights to the data generator)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((Path(__file__).parent / "synth").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except Exception:
        return "unknown"


def train(cfg: TrainConfig) -> dict:
    """Run the recipe; write the model folder; return its ``model.json`` content."""
    import torch

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    seeds = rng.integers(0, 2**31 - 1, size=cfg.n_train + cfg.n_val).tolist()
    t0 = time.time()
    anatomies = anatomy_list(cfg.anatomies)
    paths = generate(seeds, Path(cfg.cache_dir), cfg.crop_vox, cfg.workers, generator=cfg.generator,
                     anatomies=anatomies, randomised_version=cfg.randomised_version)
    t_data = time.time() - t0
    LOGGER.info("rendered %d cases in %.0f s", len(paths), t_data)
    train_cases = [load_case(p) for p in paths[: cfg.n_train]]
    val_cases = [load_case(p) for p in paths[cfg.n_train:]]
    net, kwargs, init = _initial_network(cfg)
    t0 = time.time()
    history = _fit(net, train_cases, val_cases, rng, cfg)
    t_train = time.time() - t0
    # operating point: threshold, minimum cluster size (and peak threshold) with the best mean (F1 + Dice) over
    # all combinations on all validation cases
    point, selection = select_operating_point(
        net, val_cases, cfg.combinations, context=cfg.context, thresholds=cfg.thresholds, min_sizes=cfg.min_sizes,
        peaks=cfg.peaks)
    LOGGER.info("operating point %s selected: %s", point_key(point),
                {k: round(_score(v), 4) for k, v in selection.items()})
    training = {**asdict(cfg), "seeds": seeds, "render_s": round(t_data, 1), "train_s": round(t_train, 1),
                "history": history, "initialised_from": init or None, "operating_point_selection": selection}
    return _write_model(Path(cfg.out), net, kwargs, cfg, point, training, selection[point_key(point)])


def _initial_network(cfg: TrainConfig):
    """The network to train, its ``architecture_kwargs``, and the warm start record (empty without one)."""
    from .nets import build

    kwargs = {"in_channels": n_input_channels(cfg.context), "base": cfg.base, "depth": cfg.depth}
    net = build("unet2d", **kwargs)
    if not cfg.init:
        return net, kwargs, {}
    from .infer import load_model

    base = load_model(cfg.init)  # warm start from an earlier model (its id and hash are recorded)
    old_base = base.spec.architecture_kwargs.get("base")
    old_kwargs = {**base.spec.architecture_kwargs, "in_channels": kwargs["in_channels"], "base": cfg.base}
    if base.spec.architecture != "unet2d" or old_kwargs != kwargs or base.context > cfg.context or old_base > cfg.base:
        raise ValueError(f"--init {cfg.init}: {base.spec.architecture} {base.spec.architecture_kwargs} (context "
                         f"{base.context}) does not fit {kwargs} (context {cfg.context})")
    state = {k: v.float() if v.is_floating_point() else v for k, v in base.net.state_dict().items()}
    state = widen_context(state, base.context, cfg.context)
    net.load_state_dict(widen_base(state, net.state_dict(), old_base, cfg.base))
    return net, kwargs, {"model_id": base.model_id, "sha256": base.spec.sha256, "context": base.context,
                         "base": old_base}


def _fit(net, train_cases: list[Case], val_cases: list[Case], rng: np.random.Generator, cfg: TrainConfig) -> list:
    """Train ``net`` in place on ``cfg.device``; keep the weights with the best validation score (back on the
    CPU); return the validation history."""
    import torch

    from .infer import resolve_device

    device = resolve_device(cfg.device)
    net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.iterations, pct_start=0.1)
    best, best_state, history = -1.0, None, []
    t0 = time.time()
    val_combinations = [("T2w",), ("T2w", "FLAIR", "T1w", "SWI"), ("T1w",), ("FLAIR",)]
    for it in range(1, cfg.iterations + 1):
        x, y = sample_batch(train_cases, rng, cfg)
        loss = _loss(net(torch.from_numpy(x).to(device)), torch.from_numpy(y).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if it % 50 == 0:
            LOGGER.info("it %d loss %.4f (%.2f s/it)", it, loss.item(), (time.time() - t0) / it)
        if it % cfg.val_every == 0 or it == cfg.iterations:
            scores = evaluate(net, val_cases[: max(4, len(val_cases) // 2)], val_combinations, context=cfg.context)
            score = _score(scores)
            history.append({"iteration": it, "score": score, "val": scores, "elapsed_s": time.time() - t0,
                            "device": device})
            LOGGER.info("it %d validation %s", it, json.dumps(scores))
            if score > best:
                best = score
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.to("cpu")
    net.load_state_dict({k: v.cpu() for k, v in best_state.items()})
    return history


def _write_model(out: Path, net, kwargs: dict, cfg: TrainConfig, point: tuple, training: dict,
                 validation: dict) -> dict:
    """Write ``weights.pt`` (float16) and ``model.json`` into ``out``; return the ``model.json`` content."""
    import torch

    from .infer import sha256_file

    out.mkdir(parents=True, exist_ok=True)
    weights = out / "weights.pt"
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}, weights)
    meta = {
        "model_id": out.name,
        "architecture": "unet2d",
        "architecture_kwargs": kwargs,
        "input_sequences": list(SEQUENCES),
        "context_slices": cfg.context,
        "served_combinations": ["+".join(c) for c in cfg.combinations],
        "voxel_mm": 1.0,
        "normalisation": "median-in-mask",
        "labels": {"0": "background", "1": "ePVS"},
        "threshold": float(point[0]),
        "min_cluster_voxels": int(point[1]),
        **({"peak_threshold": float(point[2])} if len(point) > 2 else {}),
        "training": training,
        "validation": validation,
        "commit": git_commit(),
        "synth_sha256": synth_source_hash(),
        "sha256": sha256_file(weights),
        "torch": torch.__version__,
    }
    (out / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epvsseg.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="model folder to write")
    for f, default in TrainConfig.__dataclass_fields__.items():
        if f in ("out", "combinations", "crop_vox", "thresholds", "min_sizes", "peaks"):
            continue
        parser.add_argument(f"--{f.replace('_', '-')}", type=type(default.default), default=default.default)
    opts = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TrainConfig(**{k: v for k, v in opts.items()})
    meta = train(cfg)
    print(json.dumps(meta["validation"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ------------------------------------------------------------ fine-tuning
@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning recipe on a user's labelled cases (see :func:`finetune`)."""

    folds: int = 5
    iterations: int = 600
    lr: float = 3e-4
    batch: int = 12
    patch: int = 64
    seed: int = 20261121
    threads: int = 2
    combination: tuple[str, ...] = ("T2w",)


def _finetune_once(base, cases: list[Case], cfg: FinetuneConfig, rng: np.random.Generator):
    import copy

    import torch

    net = copy.deepcopy(base.net).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    tcfg = TrainConfig(out="", batch=cfg.batch, patch=cfg.patch, context=base.context,
                       combinations=(tuple(cfg.combination),), pos_fraction=0.7)
    for _ in range(cfg.iterations):
        x, y = sample_batch(cases, rng, tcfg)
        loss = _loss(net(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def finetune(base, cases: list[Case], cfg: FinetuneConfig, out: Path | None = None) -> dict:
    """K-fold (or leave-one-out when ``folds >= len(cases)``) fine-tuning from a loaded model.

    Each fold fine-tunes a copy of ``base`` on the other folds' cases and evaluates it, and the
    base model before fine-tuning, on the held-out cases (voxel Dice, cluster sensitivity,
    precision, F1), both at the base model's operating point (``base.spec.operating_point``: threshold,
    minimum cluster size and mimic exclusions, through :func:`epvsseg.decision.decide`, with each case's
    ``affine``). Finally a model is fine-tuned on all cases and, when ``out`` is given,
    written there with its ``model.json`` (including the cross-validated metrics).

    Parameters
    ----------
    base : LoadedModel
        Starting weights with their spec (:func:`epvsseg.infer.load_model`, e.g. the shipped model).
    cases : list of Case
        Labelled cases (images normalised as at inference, label, brain mask), at least 2.
    cfg : FinetuneConfig

    Returns
    -------
    dict
        ``folds`` (per-fold metrics before and after), ``mean_before``, ``mean_after``.
    """
    import copy

    import torch

    if len(cases) < 2:
        raise ValueError("fine-tuning needs at least 2 labelled cases")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    k = min(cfg.folds, len(cases))
    order = rng.permutation(len(cases))
    folds = [order[i::k] for i in range(k)]
    combination = (tuple(cfg.combination),)
    spec = base.spec
    point = {"threshold": spec.threshold, "min_cluster_voxels": spec.min_cluster_voxels,
             "exclusions": spec.exclusions, "peak_threshold": spec.peak_threshold, "flip_tta": spec.flip_tta}
    results = []
    for i, test_idx in enumerate(folds):
        train_cases = [cases[j] for j in order if j not in set(test_idx)]
        test_cases = [cases[j] for j in test_idx]
        before = evaluate(base.net, test_cases, combination, context=base.context, **point)
        net = _finetune_once(base, train_cases, cfg, rng)
        after = evaluate(net, test_cases, combination, context=base.context, **point)
        key = "+".join(cfg.combination)
        results.append({"fold": i, "n_test": len(test_cases), "before": before[key], "after": after[key]})
        LOGGER.info("fold %d: before %s after %s", i, before[key], after[key])
    mean = {
        phase: {m: float(np.mean([r[phase][m] for r in results])) for m in results[0][phase]}
        for phase in ("before", "after")
    }
    summary = {"folds": results, "mean_before": mean["before"], "mean_after": mean["after"],
               "config": asdict(cfg), "n_cases": len(cases)}
    if out is not None:
        import torch

        from .infer import sha256_file

        final = _finetune_once(base, cases, cfg, rng)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k_: (v.half() if v.is_floating_point() else v) for k_, v in final.state_dict().items()},
                   out / "weights.pt")
        meta = copy.deepcopy(base.meta)
        meta.update({"model_id": out.name, "finetuned_from": base.model_id, "finetuning": summary,
                     "served_combinations": ["+".join(cfg.combination)], "sha256": sha256_file(out / "weights.pt"),
                     "commit": git_commit()})
        (out / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return summary

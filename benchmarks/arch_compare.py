"""2.5D vs 3D U-Net for ePVS: accuracy after equal CPU training time, and CPU inference speed.

Both arms train from random initialisation on the SAME cached synthetic training crops (the training cache of
the shipped model, :func:`epvsseg.train.generate` + :func:`epvsseg.train.load_case`), for the SAME wall-clock
budget on one CPU thread each, one arm after the other, with AdamW and a one-cycle schedule over the
iterations that fit the budget (seconds per iteration estimated over the first 20 iterations, run at the
schedule's starting learning rate). Both are then validated on the SAME validation crops (the last
``--n-val`` seeds of the cache) for T2w alone and for all four sequences, at thresholds 0.3-0.8, with the
metrics of :func:`epvsseg.train.evaluate` (voxel Dice; 26-connected cluster sensitivity, precision, F1
pooled over cases) after removing clusters under 2 voxels.

* **2.5D arm**: :class:`epvsseg.nets.UNet2D` (the shipped design), :func:`epvsseg.train.sample_batch`,
  :func:`epvsseg.train._loss`, validated with :func:`epvsseg.train.evaluate` (i.e. :func:`epvsseg.infer.predict`).
* **3D arm**: :class:`epvsseg.nets.UNet3D` on 3D patches sampled here with the same rules (70 % centred on
  an ePVS voxel, modality dropout over the served combinations with the same weights, the same gamma/scale
  augmentation and left-right / anterior-posterior flips), the same loss, validated with the overlapping
  sliding window of :func:`benchmarks/infer3d.py::predict_volume`.

Speed: each network's inference time on one whole-brain-sized 1 mm volume with ``--speed-threads``
threads, and the peak RSS, each in a fresh subprocess (``resource.getrusage``); parameter counts.

Writes ``benchmarks/results/arch_compare.md`` and ``.json``. The cache is only read: seeds whose ``.npz`` is
missing are skipped, nothing is rendered.

Usage: nice -n 10 python benchmarks/arch_compare.py [--minutes 12] [--cache-dir /work/train/cache2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import infer3d  # noqa: E402  (benchmarks/infer3d.py, beside this script)
from peak_memory import vm_hwm_mib  # noqa: E402

from epvsseg import infer, metrics, postproc, train  # noqa: E402
from epvsseg.nets import SEQUENCES, build, n_input_channels  # noqa: E402

VAL_COMBOS = (("T2w",), ("T2w", "FLAIR", "T1w", "SWI"))
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
N_PROBE = 20  # iterations timed before the schedule is fixed


# ------------------------------------------------------------------ 3D arm
def sample_batch_3d(cases: list[train.Case], rng: np.random.Generator, cfg: train.TrainConfig,
                    patch: tuple[int, int, int], batch: int):
    """A batch of 3D patches with modality dropout and augmentation (the rules of ``train.sample_batch``).

    Returns
    -------
    x : ndarray, shape (B, 2 * len(SEQUENCES), pi, pj, pk)
    y : ndarray, shape (B, 1, pi, pj, pk)
    """
    x = np.zeros((batch, 2 * len(SEQUENCES), *patch), np.float32)
    y = np.zeros((batch, 1, *patch), np.float32)
    weights = train.combination_weights(cfg)
    margins = [max(1, p // 10) for p in patch]
    for b in range(batch):
        case = cases[rng.integers(len(cases))]
        shape = case.label.shape
        if any(n < p for n, p in zip(shape, patch)):
            raise ValueError(f"case of shape {shape} is smaller than the 3D patch {patch}")
        if rng.random() < cfg.pos_fraction and case.label.any():
            pos = np.argwhere(case.label)
            centre = pos[rng.integers(len(pos))]
            starts = [int(np.clip(c - rng.integers(m, p - m), 0, n - p))
                      for c, p, n, m in zip(centre, patch, shape, margins)]
        else:
            starts = [int(rng.integers(0, n - p + 1)) for n, p in zip(shape, patch)]
        box = tuple(slice(s, s + p) for s, p in zip(starts, patch))
        combination = cfg.combinations[rng.choice(len(cfg.combinations), p=weights)]
        vols = {}
        for c in combination:
            v = case.images[c][box]
            gamma = float(np.exp(rng.normal(0, 0.15)))
            scale = float(np.exp(rng.normal(0, 0.1)))
            vols[c] = np.clip(scale * np.power(v, gamma), 0, 6)
        xs = infer3d.stack_channels_3d(vols, patch)
        ys = case.label[box].astype(np.float32)
        if rng.random() < 0.5:  # left-right flip (axis i is R-L)
            xs, ys = xs[:, ::-1], ys[::-1]
        if rng.random() < 0.5:  # anterior-posterior flip, as in the 2.5D sampler
            xs, ys = xs[:, :, ::-1], ys[:, ::-1]
        x[b], y[b, 0] = xs, ys
    return x, y


def evaluate_3d(net, cases: list[train.Case], combinations, thresholds, tile, overlap,
                min_cluster_voxels: int = 2) -> dict:
    """``{threshold: {combination: scores}}`` as :func:`epvsseg.train.evaluate`, with the 3D sliding window."""
    net.eval()
    out: dict = {t: {} for t in thresholds}
    for combination in combinations:
        dices: dict = {t: [] for t in thresholds}
        agreements: dict = {t: [] for t in thresholds}
        volumes: dict = {t: [0, 0] for t in thresholds}
        for case in cases:
            prob = infer3d.predict_volume({c: case.images[c] for c in combination}, case.mask, net,
                                          tile=tile, overlap=overlap)
            for t in thresholds:
                pred = postproc.remove_small_clusters(prob >= t, min_cluster_voxels)
                dices[t].append(metrics.dice(pred, case.label))
                agreements[t].append(metrics.cluster_agreement(pred, case.label))
                volumes[t][0] += int(pred.sum())
                volumes[t][1] += int(case.label.sum())
        for t in thresholds:
            sens, prec, f1 = metrics.pooled_rates(agreements[t])
            out[t]["+".join(combination)] = {"dice": float(np.mean(dices[t])), "cluster_sensitivity": sens,
                                       "cluster_precision": prec, "cluster_f1": f1,
                                       "predicted_over_true_voxels": volumes[t][0] / max(volumes[t][1], 1)}
    net.train()
    return out


# --------------------------------------------------------------- training
def train_arm(name: str, net, sample, budget_s: float, lr: float) -> dict:
    """Train ``net`` on batches from ``sample()`` for about ``budget_s`` seconds of wall clock.

    The first :data:`N_PROBE` iterations run at the one-cycle schedule's starting learning rate
    (``lr / 25``) and time the iteration; a one-cycle schedule over the iterations that fit the rest of the
    budget follows. A run that overshoots the budget by 25 % (heavier load than when it was timed) stops.
    """
    import torch

    opt = torch.optim.AdamW(net.parameters(), lr=lr / 25.0, weight_decay=1e-4)
    load_start = os.getloadavg()
    t0 = time.time()
    losses, window = [], []

    def step():
        x, y = sample()
        loss = train._loss(net(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(loss.item())
        if len(window) == 50:
            losses.append(float(np.mean(window)))
            window.clear()

    net.train()
    for _ in range(N_PROBE):
        step()
    probe_s = (time.time() - t0) / N_PROBE
    remaining = max(50, int((budget_s - (time.time() - t0)) / probe_s))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=remaining, pct_start=0.1)
    done, stopped_early = N_PROBE, False
    for i in range(remaining):
        step()
        sched.step()
        done += 1
        if i % 100 == 0:
            print(f"[{name}] it {done}/{N_PROBE + remaining} loss {losses[-1] if losses else window[-1]:.4f} "
                  f"{(time.time() - t0) / done:.2f} s/it", flush=True)
        if time.time() - t0 > 1.25 * budget_s:
            stopped_early = True
            break
    elapsed = time.time() - t0
    return {"iterations_planned": N_PROBE + remaining, "iterations": done, "stopped_early": stopped_early,
            "probe_s_per_it": probe_s, "s_per_it": elapsed / done, "train_s": elapsed,
            "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
            "loss_per_50_it": losses}


def best_threshold(by_t: dict) -> float:
    """Threshold with the best mean (cluster F1 + Dice) over the validation combinations (``train._score``)."""
    return max(by_t, key=lambda t: train._score(by_t[t]))


# ------------------------------------------------------------------ speed
def speed_worker(arch: str, weights: str, kwargs: dict, context: int, threads: int, shape, tile, overlap) -> dict:
    """Whole-volume inference time and peak RSS of one network (run in a fresh process)."""
    import torch

    torch.set_num_threads(threads)
    net = build(arch, **kwargs)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net.eval()
    rng = np.random.default_rng(0)
    grid = np.indices(shape, dtype=np.float32)
    centre = (np.asarray(shape, np.float32) - 1) / 2
    radii = np.asarray(shape, np.float32) * np.array([0.42, 0.44, 0.40], np.float32)
    mask = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1.0
    del grid
    t2 = np.where(mask, rng.gamma(4.0, 0.25, shape), 0).astype(np.float32)
    images = {"T2w": t2}
    rss_before = vm_hwm_mib()

    if arch == "unet2d":
        model = infer.LoadedModel(net, {"context_slices": context, "threshold": 0.5, "model_id": "bench"},
                                  Path("."), "cpu")

        def run(ims, m):
            return infer.predict(ims, m, model)
    else:
        def run(ims, m):
            return infer3d.predict_volume(ims, m, net, tile=tile, overlap=overlap)

    small = tuple(min(s, 48) for s in shape)  # warm-up: first-call costs are not inference
    run({"T2w": t2[: small[0], : small[1], : small[2]]}, np.ones(small, bool))
    t0 = time.time()
    prob = run(images, mask)
    seconds = time.time() - t0
    return {"architecture": arch, "threads": threads, "shape": list(shape), "mask_voxels": int(mask.sum()),
            "seconds": seconds, "rss_before_mib": rss_before,
            "peak_rss_mib": vm_hwm_mib(),
            "getrusage_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "finite": bool(np.isfinite(prob).all()), "tile": list(tile) if arch == "unet3d" else None,
            "overlap": overlap if arch == "unet3d" else None}


def measure_speed(arch, net, kwargs, context, threads, shape, tile, overlap) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "w.pt"
        torch.save(net.state_dict(), weights)
        spec = json.dumps({"arch": arch, "weights": str(weights), "kwargs": kwargs, "context": context,
                           "threads": threads, "shape": list(shape), "tile": list(tile), "overlap": overlap})
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        res = subprocess.run([sys.executable, __file__, "--speed-worker", spec], capture_output=True, text=True,
                             env=env, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"speed worker for {arch} failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ report
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "arch_compare.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out / "arch_compare.json")
    all4 = "+".join(VAL_COMBOS[1])
    lines = [
        "# 2.5D vs 3D U-Net: accuracy at equal CPU training time, and inference speed",
        "",
        f"Generated by `benchmarks/arch_compare.py` on {result['date']} (torch {result['torch']}, "
        f"{result['cpu']}, {os.cpu_count()} cores shared with other jobs; commit `{result['commit'][:10]}`).",
        "",
        f"Training: each arm from random initialisation, {result['budget_minutes']:g} min wall clock on "
        f"{result['train_threads']} thread (`nice -n 10`), arms back to back; AdamW, one-cycle over the iterations "
        f"that fit (timed over the first {N_PROBE}); max lr {result['lr']:g}. Data: {result['n_train']} cached "
        f"synthetic training crops (112x112x48 at 1 mm, seeds `np.random.default_rng({result['seed']})`, the "
        f"first {result['n_train']} of the training seeds) and {result['n_val']} validation crops (the last "
        f"{result['n_val']} seeds), from `{result['cache_dir']}`. Validation: all {result['n_val']} crops, "
        "clusters < 2 voxels removed, threshold chosen per arm as the best mean (cluster F1 + Dice) over the two "
        "combinations on the grid 0.3-0.8 (on the validation crops themselves, so optimistic for both arms alike).",
        "",
        "| arm | network | parameters | iterations | s/it | threshold | T2w Dice | T2w cluster F1 "
        "| all-4 Dice | all-4 cluster F1 | "
        + " | ".join(f"inference s / brain, {t} thread{'s' * (t > 1)}" for t in result["speed_threads"])
        + " | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(result["speed_threads"]) + 1),
    ]
    for arm in result["arms"].values():
        t = arm["threshold"]
        v = arm["validation"][str(t)]
        lines.append(
            f"| {arm['name']} | {arm['architecture']} {arm['kwargs']} | {arm['parameters']:,} | "
            f"{arm['training']['iterations']} | {arm['training']['s_per_it']:.2f} | {t:.1f} | "
            f"{v['T2w']['dice']:.3f} | {v['T2w']['cluster_f1']:.3f} | {v[all4]['dice']:.3f} | "
            f"{v[all4]['cluster_f1']:.3f} | "
            + " | ".join(f"{arm['speed'][str(n)]['seconds']:.1f}" for n in result["speed_threads"])
            + f" | {max(r['peak_rss_mib'] for r in arm['speed_runs']):.0f} |")
    lines += ["", "Best threshold per arm and combination (Dice / cluster F1 / sensitivity / precision):", "",
              "| arm | combination | threshold | Dice | cluster F1 | sensitivity | precision |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for arm in result["arms"].values():
        for combination in ("T2w", all4):
            t = max(arm["validation"], key=lambda k: arm["validation"][k][combination]["cluster_f1"]
                    + arm["validation"][k][combination]["dice"])
            v = arm["validation"][t][combination]
            lines.append(f"| {arm['name']} | {combination} | {float(t):.1f} | {v['dice']:.3f} | {v['cluster_f1']:.3f} | "
                         f"{v['cluster_sensitivity']:.3f} | {v['cluster_precision']:.3f} |")
    lines += ["", "Load average (1, 5, 15 min) at the start and end of each arm's training, and its schedule:", ""]
    for arm in result["arms"].values():
        tr = arm["training"]
        lines.append(f"- {arm['name']}: start {tuple(round(x, 2) for x in tr['loadavg_start'])}, end "
                     f"{tuple(round(x, 2) for x in tr['loadavg_end'])}; probe {tr['probe_s_per_it']:.2f} s/it, "
                     f"{tr['iterations']} of {tr['iterations_planned']} planned iterations in {tr['train_s']:.0f} s"
                     f"{' (stopped at 1.25x the budget)' if tr['stopped_early'] else ''}; batch "
                     f"{arm['batch']} x {arm['patch']}.")
    s3 = result["arms"]["3d"]["speed_runs"][0] if "3d" in result["arms"] else None
    lines += ["", f"Speed: one synthetic whole-brain-sized volume {tuple(result['speed_shape'])} at 1 mm "
              f"(ellipsoid brain mask, T2w), fresh process per network and repeat, after a small warm-up call; the "
              + (f"faster of {result['speed_repeats']} alternating repeats" if result["speed_repeats"] > 1
                 else "arms alternating, one run each")
              + "; peak RSS is the worker's `VmHWM`"
              + (f"; the 3D network tiles the mask's bounding box with {tuple(s3['tile'])} tiles at "
                 f"{s3['overlap']:.0%} overlap." if s3 else ".")]
    tmp = out / "arch_compare.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "arch_compare.md")


# ------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=12.0, help="training wall clock per arm")
    p.add_argument("--cache-dir", default="/work/train/cache2")
    p.add_argument("--seed", type=int, default=20261121)
    p.add_argument("--n-train-total", type=int, default=360, help="n_train of the cache's training run")
    p.add_argument("--n-val", type=int, default=24)
    p.add_argument("--n-train", type=int, default=120, help="training crops used here (the first ones)")
    p.add_argument("--context", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--base3d", type=int, default=8)
    p.add_argument("--patch3d", type=int, nargs=3, default=(64, 64, 32))
    p.add_argument("--batch3d", type=int, default=2)
    p.add_argument("--tile3d", type=int, nargs=3, default=(96, 96, 48))
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--speed-threads", type=int, nargs="+", default=(2, 1),
                   help="thread counts to time inference with (2 as asked; 1 because a loaded 2-core machine "
                        "makes 2-thread OpenMP runs wait on descheduled threads)")
    p.add_argument("--speed-shape", type=int, nargs=3, default=(176, 208, 176))
    p.add_argument("--speed-repeats", type=int, default=2)
    p.add_argument("--arms", default="2.5d,3d")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--speed-worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.speed_worker:
        s = json.loads(a.speed_worker)
        print(json.dumps(speed_worker(s["arch"], s["weights"], s["kwargs"], s["context"], s["threads"],
                                      tuple(s["shape"]), tuple(s["tile"]), s["overlap"])))
        return 0

    import torch

    torch.set_num_threads(1)
    seeds = np.random.default_rng(a.seed).integers(0, 2**31 - 1, size=a.n_train_total + a.n_val).tolist()
    cache = Path(a.cache_dir)
    train_seeds = [s for s in seeds[: a.n_train_total] if (cache / f"case-{s}.npz").is_file()][: a.n_train]
    val_seeds = [s for s in seeds[a.n_train_total:] if (cache / f"case-{s}.npz").is_file()]
    skipped = [s for s in seeds[: a.n_train] + seeds[a.n_train_total:] if not (cache / f"case-{s}.npz").is_file()]
    if not train_seeds or not val_seeds:
        raise SystemExit(f"{cache}: no cached cases for seed {a.seed} (render them with epvsseg.train first)")
    # every path exists, so generate() only returns them (nothing is rendered or written)
    train_paths = train.generate(train_seeds, cache, (112, 112, 48), 1)
    val_paths = train.generate(val_seeds, cache, (112, 112, 48), 1)
    t0 = time.time()
    train_cases = [train.load_case(q) for q in train_paths]
    val_cases = [train.load_case(q) for q in val_paths]
    print(f"loaded {len(train_cases)} training + {len(val_cases)} validation crops in {time.time() - t0:.0f} s",
          flush=True)

    cfg = train.TrainConfig(out="", seed=a.seed, batch=12, patch=80, context=a.context, lr=a.lr)
    budget = 60.0 * a.minutes
    arms: dict = {}
    for arm in a.arms.split(","):
        torch.manual_seed(a.seed)
        rng = np.random.default_rng(a.seed)
        if arm == "2.5d":
            kwargs = {"in_channels": n_input_channels(a.context), "base": cfg.base, "depth": cfg.depth}
            net = build("unet2d", **kwargs)
            tr = train_arm(arm, net, lambda: train.sample_batch(train_cases, rng, cfg), budget, a.lr)
            t0 = time.time()
            val = train.evaluate(net, val_cases, VAL_COMBOS, context=a.context, thresholds=THRESHOLDS)
            entry = {"architecture": "unet2d", "kwargs": kwargs, "batch": cfg.batch,
                     "patch": [cfg.patch, cfg.patch, 2 * a.context + 1], "context": a.context}
        elif arm == "3d":
            kwargs = {"in_channels": 2 * len(SEQUENCES), "base": a.base3d, "depth": cfg.depth}
            net = build("unet3d", **kwargs)
            patch = tuple(a.patch3d)
            tr = train_arm(arm, net, lambda: sample_batch_3d(train_cases, rng, cfg, patch, a.batch3d), budget, a.lr)
            t0 = time.time()
            val = evaluate_3d(net, val_cases, VAL_COMBOS, THRESHOLDS, tuple(a.tile3d), a.overlap)
            entry = {"architecture": "unet3d", "kwargs": kwargs, "batch": a.batch3d, "patch": list(patch),
                     "tile": list(a.tile3d), "overlap": a.overlap}
        else:
            raise SystemExit(f"unknown arm {arm!r} (2.5d, 3d)")
        val_s = time.time() - t0
        th = best_threshold(val)
        print(f"[{arm}] threshold {th}: {json.dumps(val[th])} (validation {val_s:.0f} s)", flush=True)
        arms[arm] = {"name": arm, **entry, "parameters": int(sum(q.numel() for q in net.parameters())),
                     "training": tr, "validation_s": val_s, "threshold": th,
                     "validation": {str(t): v for t, v in val.items()}, "net": net, "speed_runs": []}
    # speed: after training, the arms alternate (same load for both), best of the repeats reported
    for _ in range(a.speed_repeats):
        for threads in a.speed_threads:
            for arm in arms.values():
                run = measure_speed(arm["architecture"], arm["net"], arm["kwargs"], a.context, threads,
                                    tuple(a.speed_shape), tuple(a.tile3d), a.overlap)
                run["loadavg"] = list(os.getloadavg())
                print(f"[{arm['name']}] speed {run}", flush=True)
                arm["speed_runs"].append(run)
    for arm in arms.values():
        del arm["net"]
        arm["speed"] = {str(t): min((r for r in arm["speed_runs"] if r["threads"] == t), key=lambda r: r["seconds"])
                        for t in a.speed_threads}

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "commit": train.git_commit(), "budget_minutes": a.minutes, "train_threads": 1,
        "speed_threads": list(a.speed_threads), "speed_repeats": a.speed_repeats, "speed_shape": list(a.speed_shape), "lr": a.lr, "seed": a.seed,
        "torch_seed": a.seed, "cache_dir": str(cache), "n_train": len(train_cases), "n_val": len(val_cases),
        "train_seeds": train_seeds, "val_seeds": val_seeds, "skipped_missing_seeds": skipped,
        "thresholds": list(THRESHOLDS), "val_combinations": ["+".join(c) for c in VAL_COMBOS],
        "train_config_2_5d": {k: v for k, v in asdict(cfg).items() if k != "combinations"}, "arms": arms,
    }
    write_report(result, Path(a.out))
    print((Path(a.out) / "arch_compare.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

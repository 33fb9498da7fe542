"""Is a "rescan" pair one head? Image similarity after rigid, affine and deformable alignment (issues #17, #18).

The ``dcm_qa_uih`` pair (evaluation only) is used as a same-day rescan of one adult: #17 asks >= 70 % of its
clusters to be found again, #18 its two ICVs within 3 %. Nothing in the data says it is one person (the
``dcm_qa_uih`` README describes a DICOM conversion test; the two series are 21 minutes apart and their SAR differs
by 4.5 %), and the two brains differ by a 12-parameter affine of determinant 0.957 with unequal scalings per axis.
Two explanations predict different things:

* one head, one image geometrically scaled (a scanner calibration or distortion difference): the affine undoes
  the scale, and the aligned images then agree about as well as a rigidly moved, noisier copy of one scan does;
* two heads: no affine makes the ventricles, corpus callosum and gyri coincide; only a deformable registration
  brings them closer.

So the script aligns scan b to scan a (brains: N4 image x brain mask from ``real_scans.py --prep-only``,
resampled to 1 mm) rigidly, affinely and with SyN (ANTs, seeded, one thread), and reports the normalised
cross-correlation (NCC) of the intensities inside a's brain mask after each. The control is scan a against a
copy of itself moved by a known rigid transform (10 deg, 4 mm) with Gaussian noise of its own within-brain
intensity spread x 0.1 added, registered the same way: the similarity one head reaches under this method.

Usage: python benchmarks/rescan_identity.py [--pair uih_132750_t1w uih_134917_t1w]
Writes ``benchmarks/results/rescan_identity.{md,json}`` and ``docs/figures/rescan_identity.png``.
"""

from __future__ import annotations

import os

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
FIGURE = ROOT / "docs" / "figures" / "rescan_identity.png"
KINDS = ("Rigid", "Affine", "SyN")
SEED = 20261205


def brain_1mm(name: str):
    """The prepared brain of a real scan (:func:`real_scans.brain_1mm`) as an ANTs image."""
    from real_scans import brain_1mm as prepared_brain
    from real_scans import load_prepared

    from epvsprep import ops

    return ops.nib_to_ants(prepared_brain(load_prepared(name)))


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two images' intensities inside ``mask``."""
    return float(np.corrcoef(a[mask], b[mask])[0, 1])


def align(fixed, moving) -> dict:
    """NCC inside the fixed brain after each registration kind, the affine's determinant, and the warped images."""
    import ants

    from epvsprep import ops

    mask = fixed.numpy() > 0
    out: dict = {"ncc": {}, "seconds": {}, "warped": {}}
    for kind in KINDS:
        t0 = time.perf_counter()
        with ops.ants_seeded(SEED):
            reg = ants.registration(fixed=fixed, moving=moving, type_of_transform=kind)
        out["seconds"][kind] = round(time.perf_counter() - t0, 1)
        out["warped"][kind] = reg["warpedmovout"].numpy()
        out["ncc"][kind] = round(ncc(fixed.numpy(), out["warped"][kind], mask), 4)
        if kind == "Affine":
            matrix = ants.read_transform(reg["fwdtransforms"][-1]).parameters[:9].reshape(3, 3)
            out["affine_det"] = round(float(np.linalg.det(matrix)), 4)
    out["ncc"]["none"] = round(ncc(fixed.numpy(), ants.resample_image_to_target(moving, fixed).numpy(), mask), 4)
    return out


def control_copy(fixed, rng: np.random.Generator):
    """``fixed`` moved by a known rigid transform (10 deg about the vertical axis, 4 mm) with Gaussian noise."""
    import ants

    data = fixed.numpy()
    brain = data > 0
    noisy = ants.from_numpy((data + rng.normal(0, 0.1 * data[brain].std(), data.shape) * brain).astype(np.float32),
                            origin=fixed.origin, spacing=fixed.spacing, direction=fixed.direction)
    tx = ants.create_ants_transform(transform_type="Euler3DTransform", dimension=3,
                                    center=ants.get_center_of_mass(fixed), translation=(4.0, 0.0, 0.0))
    tx.set_parameters([0.0, 0.0, np.radians(10.0), 4.0, 0.0, 0.0])
    return tx.apply_to_image(noisy, reference=fixed, interpolation="linear")


def figure(fixed: np.ndarray, warped: dict, names: tuple[str, str], path: Path) -> None:
    """Axial, coronal and sagittal slices through the brain's centre: a, b rigidly and b affinely aligned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    c = np.array(ndimage.center_of_mass(fixed > 0)).astype(int)
    views = {"axial": lambda v: v[:, :, c[2] + 15], "coronal": lambda v: v[:, c[1]], "sagittal": lambda v: v[c[0] + 8]}
    columns = [(names[0], fixed), (f"{names[1]}, rigid", warped["Rigid"]), (f"{names[1]}, affine", warped["Affine"])]
    scale = float(np.percentile(fixed[fixed > 0], 99))
    fig, axes = plt.subplots(3, 3, figsize=(11, 11))
    for r, (view, cut) in enumerate(views.items()):
        for k, (title, vol) in enumerate(columns):
            axes[r, k].imshow(np.rot90(np.clip(cut(vol) / scale, 0, 1)), cmap="gray")
            axes[r, k].set_axis_off()
            if r == 0:
                axes[r, k].set_title(title, fontsize=10)
    fig.suptitle("Same slice of the fixed brain's grid: ventricles, corpus callosum and gyri", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def markdown(res: dict) -> str:
    pair, ctrl = res["pair"], res["control"]
    rows = "".join(f"| {k} | {pair['ncc'][k]:.3f} | {ctrl['ncc'][k]:.3f} |\n" for k in ("none", *KINDS))
    return (f"# Is the rescan pair one head? (issues #17, #18)\n\nCommand: `{res['command']}`. Set: evaluation only "
            f"(measured, nothing chosen by it). Method: `benchmarks/rescan_identity.py` docstring. Fixed: "
            f"`{res['names'][0]}`; moving: `{res['names'][1]}`, and for the control a rigidly moved noisy copy of the "
            "fixed brain. NCC: correlation of the intensities inside the fixed brain mask, 1 mm.\n\n"
            f"| alignment | {res['names'][1]} | control (same head) |\n|---|---|---|\n{rows}\n"
            f"Affine determinant: pair {pair['affine_det']}, control {ctrl['affine_det']}. Seconds (rigid / affine / "
            f"SyN): pair {' / '.join(str(pair['seconds'][k]) for k in KINDS)}.\n\n"
            f"Figure: `docs/figures/rescan_identity.png`.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=2, default=("uih_132750_t1w", "uih_134917_t1w"))
    opts = parser.parse_args()
    fixed, moving = (brain_1mm(n) for n in opts.pair)
    pair = align(fixed, moving)
    control = align(fixed, control_copy(fixed, np.random.default_rng(SEED)))
    figure(fixed.numpy(), pair["warped"], tuple(opts.pair), FIGURE)
    res = {"command": "python benchmarks/rescan_identity.py " + " ".join(sys.argv[1:]), "names": list(opts.pair),
           "pair": {k: v for k, v in pair.items() if k != "warped"},
           "control": {k: v for k, v in control.items() if k != "warped"}}
    (RESULTS / "rescan_identity.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / "rescan_identity.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()

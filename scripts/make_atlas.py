"""Build the template and region-atlas kit shipped in ``epvsprep/data/templates/`` (reproducible).

Sources (all permissively licensed, see ``docs/atlas.md``):

- ICBM 2009a nonlinear symmetric T1w template and grey/white-matter probability maps
  (Fonov et al. 2009, 2011), as shipped inside the nilearn wheel (BSD-3 + MNI notice);
- the CIT168 subcortical atlas (Pauli et al. 2018, CC BY 4.0), already in
  ``epvsprep/data/atlases/`` as a maximum-probability label map.

Everything else is *derived by rules written here*: the intracranial mask, the CSF map,
the thalamus, midbrain, hippocampal, insular and centrum-semiovale regions, the lobar
white-matter split and the hemispheres. The rules are stated in MNI millimetres
(RAS+, x = 0 is the midline of the symmetric template); they are approximate and are
documented with their accuracy in ``docs/atlas.md``. The AAL atlas is *not* used for
anything shipped (its GPL terms do not fit an Apache-2.0 package); ``--compare-aal``
only reports the agreement with it when a copy is at hand (development).

Run::

    python scripts/make_atlas.py            # writes epvsprep/data/templates/
    python scripts/make_atlas.py --compare-aal ../shared/data/debian_mricron-data/aal.nii.gz

The output is deterministic (no random numbers); ``MANIFEST.json`` lists the sha256 of
every file written, and ``tests/epvsprep/test_regions.py`` checks those hashes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "epvsprep" / "data" / "templates"
CIT168 = ROOT / "epvsprep" / "data" / "atlases" / "CIT168_maxprob_thr25_1mm.nii.gz"
CIT168_TSV = ROOT / "epvsprep" / "data" / "atlases" / "CIT168_maxprob_thr25_1mm_labels.tsv"

TEMPLATE = "ICBM152NLin2009aSym"

#: (index, region, hemisphere) in the order of the label map; names are ``<region>_<hemisphere>``.
REGIONS: tuple[tuple[int, str, str], ...] = (
    (1, "basal_ganglia", "left"), (2, "basal_ganglia", "right"),
    (3, "thalamus", "left"), (4, "thalamus", "right"),
    (5, "centrum_semiovale", "left"), (6, "centrum_semiovale", "right"),
    (7, "midbrain", "bilateral"),
    (8, "hippocampus", "left"), (9, "hippocampus", "right"),
    (10, "insula", "left"), (11, "insula", "right"),
    (12, "frontal_wm", "left"), (13, "frontal_wm", "right"),
    (14, "parietal_wm", "left"), (15, "parietal_wm", "right"),
    (16, "temporal_wm", "left"), (17, "temporal_wm", "right"),
    (18, "occipital_wm", "left"), (19, "occipital_wm", "right"),
    (20, "other", "bilateral"),
)

#: CIT168 structures that make up the basal ganglia region (both sides).
BASAL_GANGLIA_CIT = ("Putamen", "Caudate", "Nucleus Accumbens", "Globus Pallidus externa",
                     "Globus Pallidus interna", "Ventral Pallidum")
#: CIT168 midbrain nuclei (added to the geometric midbrain box).
MIDBRAIN_CIT = ("Substantia Nigra pars compacta", "Red Nucleus", "Substantia-Nigra-pars-reticulata",
                "Parabrachial Pigmented", "Ventral Tegmental Area")
#: CIT168 diencephalic structures kept out of the thalamus and midbrain.
DIENCEPHALON_CIT = ("Hypothalamus", "Mammillary Nucleus", "Subthalamic Nucleus", "Habenular Nucleus",
                    "Extended Amygdala")


def nilearn_maps() -> dict[str, nib.Nifti1Image]:
    """ICBM 2009a sym T1w, GM and WM maps from the installed nilearn wheel (no download)."""
    import nilearn

    base = Path(nilearn.__file__).parent / "datasets" / "data"
    out = {}
    for key, fname in (("T1w", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
                       ("GM", "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"),
                       ("WM", "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")):
        out[key] = nib.load(str(base / fname))
    return out


def world_grid(shape, affine) -> np.ndarray:
    """World (RAS mm) coordinates of every voxel centre, shape ``(3, I, J, K)``."""
    ijk = np.indices(shape, dtype=np.float32)
    return np.einsum("ab,bijk->aijk", affine[:3, :3].astype(np.float32), ijk) + \
        affine[:3, 3].astype(np.float32)[:, None, None, None]


def ball(radius_mm: float) -> np.ndarray:
    r = int(np.ceil(radius_mm))
    g = np.indices((2 * r + 1,) * 3) - r
    return (g**2).sum(0) <= radius_mm**2


def intracranial_mask(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Intracranial cavity: brain tissue closed by a 6 mm ball, holes filled, then 1 mm dilated.

    Closing bridges the sulci and fills the ventricles (CSF inside the skull); the result
    approximates the inner table of the skull on this template.
    """
    tissue = (gm + wm) > 0.2
    lab, _ = ndimage.label(tissue)
    tissue = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    closed = ndimage.binary_closing(np.pad(tissue, 8), ball(6.0))[8:-8, 8:-8, 8:-8]
    filled = np.zeros_like(closed)
    for k in range(closed.shape[2]):  # fill per axial slice and in 3D
        filled[:, :, k] = ndimage.binary_fill_holes(closed[:, :, k])
    filled = ndimage.binary_fill_holes(filled)
    return ndimage.binary_dilation(filled, ball(1.0))


def cit168_on(grid_img: nib.Nifti1Image) -> tuple[np.ndarray, dict[str, list[int]]]:
    """CIT168 labels resampled by world coordinates (nearest neighbour) onto ``grid_img``'s grid."""
    import pandas as pd

    cit = nib.load(str(CIT168))
    src = np.asanyarray(cit.dataobj).astype(np.int16)
    vox = np.linalg.solve(cit.affine, np.vstack([world_grid(grid_img.shape, grid_img.affine).reshape(3, -1),
                                                 np.ones((1, int(np.prod(grid_img.shape))), np.float32)]))
    out = ndimage.map_coordinates(src, vox[:3], order=0, mode="constant", cval=0).reshape(grid_img.shape)
    names = pd.read_csv(CIT168_TSV, sep="\t")
    by_structure: dict[str, list[int]] = {}
    for _, row in names.iterrows():
        if row["index"] == 0:
            continue
        by_structure.setdefault(str(row["name"])[2:], []).append(int(row["index"]))
    return out, by_structure


def build_regions(maps: dict[str, nib.Nifti1Image]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Apply the region rules on the 1 mm template grid.

    Returns
    -------
    labels : ndarray of uint8, shape of the template
        Region index per voxel (``REGIONS``), 0 outside the intracranial mask.
    extra : dict
        ``icv`` (bool), ``brain`` (bool), ``csf`` (float probability) on the same grid.
    """
    affine = maps["GM"].affine
    gm = maps["GM"].get_fdata(dtype=np.float32) / 255.0
    wm = maps["WM"].get_fdata(dtype=np.float32) / 255.0
    x, y, z = world_grid(gm.shape, affine)
    icv = intracranial_mask(gm, wm)
    csf = np.clip(icv - gm - wm, 0, 1) * icv
    brain = ((gm + wm) > 0.5) & icv
    cit, cit_ids = cit168_on(maps["GM"])

    def cit_mask(names):
        return np.isin(cit, [i for n in names for i in cit_ids[n]])

    ax = np.abs(x)
    left = x < 0
    labels = np.zeros(gm.shape, np.uint8)
    taken = np.zeros(gm.shape, bool)

    def assign(mask, region):
        nonlocal taken
        mask = mask & ~taken & icv
        for idx, reg, hemi in REGIONS:
            if reg != region:
                continue
            side = {"left": left, "right": ~left, "bilateral": np.ones_like(left)}[hemi]
            labels[mask & side] = idx
        taken |= mask

    # basal ganglia: CIT168 nuclei, closed by a 3 mm ball to take in the anterior limb of the internal
    # capsule between caudate and putamen (where basal-ganglia ePVS are rated), per hemisphere
    bg = cit_mask(BASAL_GANGLIA_CIT)
    bg = (ndimage.binary_closing(bg & left, ball(3.0)) & left) | (ndimage.binary_closing(bg & ~left, ball(3.0)) & ~left)
    bg &= (gm + wm) > 0.3
    assign(bg, "basal_ganglia")
    dien = cit_mask(DIENCEPHALON_CIT)
    taken |= dien  # hypothalamus etc. stay "other"
    # midbrain: tissue in a box below the thalamus, plus the CIT168 midbrain nuclei
    mid_box = (ax <= 15) & (y >= -38) & (y <= -8) & (z >= -22) & (z <= -4) & ((gm + wm) > 0.5)
    assign(mid_box | cit_mask(MIDBRAIN_CIT), "midbrain")
    # thalamus: deep tissue medial to the internal capsule, between the third and lateral ventricles
    thal_box = (ax >= 1) & (ax <= 23) & (y >= -36) & (y <= -3) & (z >= -3) & (z <= 20)
    thal_box &= ((ax - 11.5) / 11.0) ** 2 + ((y + 18.0) / 17.0) ** 2 + ((z - 8.0) / 11.0) ** 2 <= 1.0
    assign(thal_box & (gm > 0.3) & ((gm + wm) > 0.6), "thalamus")
    # hippocampal region: medial temporal grey matter
    hip_box = (ax >= 14) & (ax <= 38) & (y >= -42) & (y <= -4) & (z >= -26) & (z <= 4)
    hip_box &= ((ax - 27.0) / 12.0) ** 2 + ((y + 21.0) / 20.0) ** 2 + ((z + 11.0) / 12.0) ** 2 <= 1.0
    assign(hip_box & (gm > 0.4), "hippocampus")
    # insula: grey matter deep in the lateral sulcus, medial to the opercula
    ins_box = (ax >= 28) & (ax <= 44) & (y >= -30) & (y <= 30) & (z >= -16) & (z <= 24)
    ins_box &= ((ax - 37.0) / 8.0) ** 2 + ((y - 4.0) / 28.0) ** 2 + ((z - 4.0) / 18.0) ** 2 <= 1.0
    assign(ins_box & (gm > 0.4), "insula")
    # white matter for CSO and lobes (WM probability > 0.5)
    wmask = (wm > 0.5) & icv
    depth = ndimage.distance_transform_edt(wmask)  # mm on this 1 mm grid
    vent = (csf > 0.5) & (ax <= 30) & (y >= -45) & (y <= 35) & (z >= -5) & (z <= 40)
    lab, _ = ndimage.label(vent)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = np.isin(lab, np.flatnonzero(sizes > 2000))
    vent_top = float(z[body].max()) if body.any() else 25.0
    cso = wmask & (z > vent_top) & (z <= vent_top + 30.0) & (depth >= 3.0) & (ax >= 8)
    assign(cso, "centrum_semiovale")
    # lobar white matter by planes (approximate): central sulcus, parieto-occipital and sylvian boundaries
    central = y - (-18.0 - 0.45 * (z - 40.0))  # > 0 in front of a plane tilted like the central sulcus
    occipital = y < -60.0 - 0.3 * np.clip(z, 0, None)  # parieto-occipital sulcus, tilted backwards upwards
    temporal = (z < 0.35 * np.clip(-(y - 10.0), 0, None) - 8.0) & (y < 12.0) & ~occipital
    frontal = (central > 0) & ~temporal
    parietal = ~frontal & ~temporal & ~occipital
    # the cerebellum and brainstem lie below a surface approximating the tentorium; they stay "other"
    infratentorial = ((y < -38) & (z < -12.0 + 8.0 * np.exp(-(x**2) / 288.0))) | ((ax < 16) & (z < -20)) | ((y < -25) & (z < -30))
    for region, mask in (("temporal_wm", temporal), ("occipital_wm", occipital), ("frontal_wm", frontal),
                         ("parietal_wm", parietal)):
        assign(wmask & mask & ~infratentorial, region)
    # everything else inside the intracranial mask (cortex, cerebellum, pons, CSF, hypothalamus...)
    labels[icv & (labels == 0)] = 20
    return labels, {"icv": icv, "brain": brain, "csf": csf}


def crop_box(mask: np.ndarray, margin: int = 6) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def cropped(img_data: np.ndarray, affine: np.ndarray, box, dtype) -> nib.Nifti1Image:
    start = np.array([s.start or 0 for s in box] + [1.0])
    new_aff = affine.copy()
    new_aff[:3, 3] = (affine @ start)[:3]
    out = nib.Nifti1Image(np.asarray(img_data[box]).astype(dtype), new_aff)
    out.set_data_dtype(dtype)
    out.header.set_xyzt_units("mm")
    out.set_qform(new_aff, 4)  # 4 = MNI152 space
    out.set_sform(new_aff, 4)
    return out


def downsample2(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average 2x2x2 blocks (after padding to even) -> 2 mm grid; voxel centres move by +0.5 mm."""
    pad = [(0, s % 2) for s in data.shape]
    d = np.pad(data.astype(np.float32), pad)
    d = d.reshape(d.shape[0] // 2, 2, d.shape[1] // 2, 2, d.shape[2] // 2, 2).mean(axis=(1, 3, 5))
    aff = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = (affine @ np.array([0.5, 0.5, 0.5, 1.0]))[:3]
    return d, aff


def save(img: nib.Nifti1Image, path: Path) -> None:
    # gzip with mtime 0 so that the bytes (and hashes) are reproducible
    import gzip

    tmp = path.with_suffix("")  # .nii
    img.to_filename(str(tmp))
    data = tmp.read_bytes()
    tmp.unlink()
    with open(path, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=9) as gz:
        gz.write(data)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--compare-aal", type=Path, default=None,
                        help="AAL label map (mricron-data aal.nii.gz) to report agreement with (not shipped)")
    args = parser.parse_args(argv)
    maps = nilearn_maps()
    labels, extra = build_regions(maps)
    affine = maps["GM"].affine
    box = crop_box(extra["icv"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"tpl-{TEMPLATE}"
    files = {}
    files["labels"] = args.out / f"{stem}_res-1_atlas-epvsregions_dseg.nii.gz"
    save(cropped(labels, affine, box, np.uint8), files["labels"])
    # 2 mm images for registration and tissue-based QC (uint8, 0-255)
    t1 = maps["T1w"].get_fdata(dtype=np.float32)
    gm = maps["GM"].get_fdata(dtype=np.float32) / 255.0
    wm = maps["WM"].get_fdata(dtype=np.float32) / 255.0
    layers = {
        "T1w": t1 / max(float(t1.max()), 1.0),
        "label-GM_probseg": gm, "label-WM_probseg": wm, "label-CSF_probseg": extra["csf"],
        "desc-icv_mask": extra["icv"].astype(np.float32), "desc-brain_mask": extra["brain"].astype(np.float32),
    }
    for key, data in layers.items():
        small, aff2 = downsample2(data[box], cropped(labels, affine, box, np.uint8).affine)
        files[key] = args.out / f"{stem}_res-2_{key}.nii.gz"
        save(cropped(np.round(np.clip(small, 0, 1) * 255), aff2, tuple(slice(None) for _ in range(3)),
                     np.uint8), files[key])
    import pandas as pd

    tsv = pd.DataFrame([{"index": i, "name": f"{r}_{h}" if h != "bilateral" else r, "region": r, "hemisphere": h}
                        for i, r, h in REGIONS])
    files["tsv"] = args.out / f"{stem}_atlas-epvsregions_dseg.tsv"
    tsv.to_csv(files["tsv"], sep="\t", index=False)
    vols = {name: int((labels == i).sum()) for i, name in zip(tsv["index"], tsv["name"])}
    manifest = {
        "template": TEMPLATE,
        "icv_mm3": int(extra["icv"].sum()),
        "brain_mm3": int(extra["brain"].sum()),
        "region_volumes_mm3": vols,
        "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files.values()},
        "built_by": "scripts/make_atlas.py",
    }
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: v for k, v in manifest.items() if k != "sha256"}, indent=1))
    if args.compare_aal:
        compare_aal(labels, maps["GM"], args.compare_aal)
    return 0


def compare_aal(labels: np.ndarray, grid: nib.Nifti1Image, aal_path: Path) -> dict[str, float]:
    """Dice of our rule-based regions with AAL's (development check; AAL lives in Colin27 space)."""
    aal = nib.load(str(aal_path))
    src = np.asanyarray(aal.dataobj).astype(np.int16)
    w = world_grid(grid.shape, grid.affine).reshape(3, -1)
    vox = np.linalg.solve(aal.affine, np.vstack([w, np.ones((1, w.shape[1]), np.float32)]))
    a = ndimage.map_coordinates(src, vox[:3], order=0, mode="constant").reshape(grid.shape)
    pairs = {"thalamus_left": [77], "thalamus_right": [78], "hippocampus_left": [37], "hippocampus_right": [38],
             "insula_left": [29], "insula_right": [30], "basal_ganglia_left": [71, 73, 75],
             "basal_ganglia_right": [72, 74, 76]}
    index = {f"{r}_{h}": i for i, r, h in REGIONS}
    out = {}
    for name, ids in pairs.items():
        ours = labels == index[name]
        ref = np.isin(a, ids)
        out[name] = round(float(2 * (ours & ref).sum() / max(ours.sum() + ref.sum(), 1)), 3)
    print("Dice with AAL (Colin27 space, development check):", json.dumps(out))
    return out


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    raise SystemExit(main())

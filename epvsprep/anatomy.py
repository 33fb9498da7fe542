"""Template-based anatomy: the region atlas, template-to-subject registration, ICV and region measures.

The shipped kit (``epvsprep/data/templates/``, built by ``scripts/make_atlas.py``) holds the
ICBM 2009a nonlinear symmetric template at 2 mm (T1w intensities; grey-matter, white-matter and
CSF probabilities; intracranial and brain masks) and the ePVS region atlas at 1 mm on the same
template space (``docs/atlas.md``). Like :mod:`epvsprep.ops`, every function here takes and
returns in-memory images or arrays on nibabel's ``(i, j, k)`` voxel order; nothing reads the
app's configuration.

Template sequence. The subject's image is matched with a template of the same sequence: the T1w
template for T1w; for T2w, FLAIR and SWI a template synthesised from the tissue probabilities
(:func:`synthesise_contrast`), unless ``$TEMPLATEFLOW_HOME`` already holds a real
``tpl-MNI152NLin2009aSym`` image of that sequence (never downloaded).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np

from .ops import ImageError, ants_seeded, ants_to_nib, nib_to_ants

LOGGER = logging.getLogger(__name__)

TEMPLATE = "ICBM152NLin2009aSym"
#: TemplateFlow's name for the same template (used only when it is already on disk).
TEMPLATEFLOW_NAME = "MNI152NLin2009aSym"

#: Mean tissue intensities (arbitrary units, CSF, GM, WM) used to synthesise template sequences.
#: Ratios follow typical 3 T appearance: T2w CSF brightest and WM darkest; FLAIR CSF suppressed
#: and GM brighter than WM; SWI magnitude roughly T2*-like.
TISSUE_MEANS = {
    "T1w": (0.25, 0.60, 0.90),
    "T2w": (1.00, 0.55, 0.38),
    "FLAIR": (0.12, 0.75, 0.55),
    "SWI": (0.85, 0.55, 0.45),
}

#: Region names, in the order of the atlas table columns.
REGION_NAMES = ("basal_ganglia", "centrum_semiovale", "thalamus", "midbrain", "hippocampus", "insula",
                "frontal_wm", "parietal_wm", "temporal_wm", "occipital_wm", "other")

#: Plausible adult intracranial volume (mm³); outside it the ICV is flagged in QC.
ICV_RANGE_MM3 = (1000e3, 2200e3)


# ------------------------------------------------------------------------------ the kit
@dataclass(frozen=True)
class TemplateKit:
    """Template images and the region atlas (all RAS+, template space in mm).

    Attributes
    ----------
    images : dict
        ``T1w``, ``GM``, ``WM``, ``CSF`` (probabilities in [0, 1]), ``icv``, ``brain`` (masks, 0/1),
        float32 images on the 2 mm template grid; plus real ``T1w``/``T2w`` images from TemplateFlow
        when available (keys ``tf-T1w``, ``tf-T2w``).
    labels : Nifti1Image
        uint8 region label map on the 1 mm template grid (0 outside the intracranial mask).
    table : pandas.DataFrame
        ``index``, ``name``, ``region``, ``hemisphere`` of every label.
    sources : dict
        Where each image came from (``embedded`` or a file path).
    """

    images: dict
    labels: nib.Nifti1Image
    table: object
    sources: dict = field(default_factory=dict)


def kit_dir() -> Path:
    """Folder of the shipped template kit."""
    return Path(str(resources.files("epvsprep") / "data" / "templates"))


def _load_float(path: Path, scale: float = 1.0) -> nib.Nifti1Image:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).astype(np.float32) * scale
    return nib.Nifti1Image(data, img.affine)


def templateflow_image(sequence: str, home: str | os.PathLike | None = None) -> Path | None:
    """A real TemplateFlow image of ``sequence`` already on disk, or None.

    Only looks at ``$TEMPLATEFLOW_HOME/tpl-MNI152NLin2009aSym/`` (resolution 1 or 2) and only
    accepts a non-empty, readable file: TemplateFlow's empty placeholders would trigger a
    download, which this package never does.
    """
    home = home if home is not None else os.environ.get("TEMPLATEFLOW_HOME")
    if not home:
        return None
    folder = Path(home) / f"tpl-{TEMPLATEFLOW_NAME}"
    for res in ("2", "1"):
        img = folder / f"tpl-{TEMPLATEFLOW_NAME}_res-{res}_{sequence}.nii.gz"
        mask = folder / f"tpl-{TEMPLATEFLOW_NAME}_res-{res}_desc-brain_mask.nii.gz"
        try:
            if img.is_file() and mask.is_file() and img.stat().st_size > 1000 and mask.stat().st_size > 100:
                nib.load(str(img))  # a readable header, or an exception
                return img
        except (OSError, nib.filebasedimages.ImageFileError):
            continue
    return None


@lru_cache(maxsize=2)
def load_kit(templateflow_home: str | None = None) -> TemplateKit:
    """Load the shipped template kit (cached per process).

    Parameters
    ----------
    templateflow_home : str, optional
        TemplateFlow folder to look in for real T1w/T2w template images; default
        ``$TEMPLATEFLOW_HOME``. Nothing is ever downloaded.
    """
    import pandas as pd

    root = kit_dir()
    stem = f"tpl-{TEMPLATE}"
    images: dict[str, nib.Nifti1Image] = {}
    for key, name in (("T1w", "T1w"), ("GM", "label-GM_probseg"), ("WM", "label-WM_probseg"),
                      ("CSF", "label-CSF_probseg"), ("icv", "desc-icv_mask"), ("brain", "desc-brain_mask")):
        path = root / f"{stem}_res-2_{name}.nii.gz"
        if not path.is_file():
            raise ImageError("template kit file missing (reinstall epvs-bids)", path)
        images[key] = _load_float(path, 1.0 / 255.0)
    sources = {k: "embedded" for k in images}
    for sequence in ("T1w", "T2w"):
        found = templateflow_image(sequence, templateflow_home)
        if found is not None:
            mask = _load_float(found.with_name(found.name.replace(f"_{sequence}.", "_desc-brain_mask.")))
            img = _load_float(found)
            data = np.asanyarray(img.dataobj) * (np.asanyarray(mask.dataobj) > 0)
            images[f"tf-{sequence}"] = nib.Nifti1Image(data.astype(np.float32), img.affine)
            sources[f"tf-{sequence}"] = str(found)
    labels = nib.load(str(root / f"{stem}_res-1_atlas-epvsregions_dseg.nii.gz"))
    labels = nib.Nifti1Image(np.asanyarray(labels.dataobj).astype(np.uint8), labels.affine)
    table = pd.read_csv(root / f"{stem}_atlas-epvsregions_dseg.tsv", sep="\t")
    sources["labels"] = "embedded"
    return TemplateKit(images, labels, table, sources)


def synthesise_contrast(kit: TemplateKit, sequence: str) -> nib.Nifti1Image:
    """Brain-only template image in ``sequence``, on the 2 mm template grid.

    T1w uses the real template; T2w uses a TemplateFlow T2w when one is on disk. Otherwise the
    image is ``sum_t p_t * mu_t`` over CSF, GM and WM probabilities ``p_t`` with the means
    ``mu_t`` of :data:`TISSUE_MEANS`, inside the intracranial mask.

    Returns
    -------
    Nifti1Image
        float32 image; 0 outside the intracranial mask.
    """
    if f"tf-{sequence}" in kit.images:
        return kit.images[f"tf-{sequence}"]
    if sequence not in TISSUE_MEANS:
        raise ValueError(f"no template sequence for {sequence!r} (known: {sorted(TISSUE_MEANS)})")
    icv = np.asanyarray(kit.images["icv"].dataobj) > 0.5
    if sequence == "T1w":
        data = np.asanyarray(kit.images["T1w"].dataobj) * icv
    else:
        csf, gm, wm = (np.asanyarray(kit.images[k].dataobj) for k in ("CSF", "GM", "WM"))
        m_csf, m_gm, m_wm = TISSUE_MEANS[sequence]
        data = (csf * m_csf + gm * m_gm + wm * m_wm) * icv
    return nib.Nifti1Image(data.astype(np.float32), kit.images["icv"].affine)


# ------------------------------------------------------------------ registration
@dataclass(frozen=True)
class TemplateRegistration:
    """Template and atlas mapped onto a subject's grid.

    Attributes
    ----------
    labels : Nifti1Image
        uint8 region labels on the subject grid (nearest-label interpolation).
    icv_mask : Nifti1Image
        uint8 intracranial mask on the subject grid (template ICV mask, linear then >= 0.5).
    brain_mask : Nifti1Image
        uint8 template brain mask on the subject grid (a cross-check of the subject's brain mask).
    gm, wm : Nifti1Image
        float32 template tissue probabilities on the subject grid (for tissue-based QC).
    warped : Nifti1Image
        float32 template image (the sequence used) on the subject grid, for the report.
    similarity_before, similarity_after : float
        Mattes mutual information (more negative is better) between subject and template
        on the 2 mm registration grid: header (world) alignment vs after registration.
    mask_dice : float
        Dice between the warped template brain mask and the subject's brain mask.
    ok : bool
        ``similarity_after <= similarity_before + 1 % + 0.001`` (no worse than the header alignment) and
        ``mask_dice >= 0.8``.
    sequence, transform : str
        Template sequence and transform type used.
    seconds : float
        Wall time of the registration (s).
    affine_icv_mm3 : float or None
        The template's ICV scaled by the affine part of the registration (:func:`_affine_icv_mm3`), mm³.
    """

    labels: nib.Nifti1Image
    icv_mask: nib.Nifti1Image
    brain_mask: nib.Nifti1Image
    gm: nib.Nifti1Image
    wm: nib.Nifti1Image
    warped: nib.Nifti1Image
    similarity_before: float
    similarity_after: float
    mask_dice: float
    ok: bool
    sequence: str
    transform: str
    seconds: float
    affine_icv_mm3: float | None = None


#: Registration settings by name: ``(type_of_transform, syn iterations per level, grid mm)``.
#: ``fast`` is the default (chosen in docs/preprocessing.md from the accuracy/speed benchmark).
REGISTRATION_SETTINGS = {
    "coarse": ("Affine", (), 4.0),  # previews and tests only
    "affine": ("Affine", (), 2.0),
    "fast": ("SyN", (40, 20, 0), 2.0),
    "precise": ("SyN", (100, 70, 40), 2.0),
}


def _resample_iso(aimg, mm: float):
    import ants

    if np.allclose(aimg.spacing, (mm, mm, mm), atol=1e-3):
        return aimg
    return ants.resample_image(aimg, (mm, mm, mm), use_voxels=False, interp_type=0)


#: Margin (mm) around the subject's brain mask and the template's region seen by the registration: 0, because the
#: template is zero outside its intracranial mask; any margin lets the subject's skull and scalp pull the
#: template's intracranial edge out to the margin's edge (the ICV was 1.4 x the brain mask with 8 mm).
REGISTRATION_MARGIN_MM = 0.0
#: Which template mask corresponds to a subject's brain mask in the registration (``icv`` or ``brain``).
TEMPLATE_REGION = "icv"


def template_region(kit: TemplateKit) -> np.ndarray:
    """The template voxels matched with the subject's brain mask (bool, 2 mm template grid)."""
    from scipy import ndimage

    return ndimage.binary_fill_holes(np.asanyarray(kit.images[TEMPLATE_REGION].dataobj) > 0.5)


def _within(mask: np.ndarray, affine: np.ndarray, margin_mm: float) -> np.ndarray:
    """Voxels of ``mask`` or at most ``margin_mm`` (mm) outside it (bool, same shape)."""
    if margin_mm <= 0:
        return mask
    from scipy import ndimage

    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return ndimage.distance_transform_edt(~mask, sampling=zooms) <= margin_mm


def registration_inputs(subject: nib.Nifti1Image, mask: np.ndarray, kit: TemplateKit, sequence: str,
                        margin_mm: float = REGISTRATION_MARGIN_MM) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """The two images the template registration sees: ``(subject, template)``, float32.

    The subject is zeroed outside its brain mask and the template outside :func:`template_region`
    (each plus ``margin_mm``): what lies outside (skull, scalp, neck) cannot move the template's
    intracranial edge.
    """
    sdata = np.asanyarray(subject.dataobj).astype(np.float32) * _within(mask, subject.affine, margin_mm)
    template = synthesise_contrast(kit, sequence)
    tdata = np.asanyarray(template.dataobj) * _within(template_region(kit), template.affine, margin_mm)
    return (nib.Nifti1Image(sdata, subject.affine),
            nib.Nifti1Image(tdata.astype(np.float32), template.affine))


def register_template(
    subject: nib.Nifti1Image,
    subject_mask: nib.Nifti1Image,
    kit: TemplateKit,
    *,
    sequence: str,
    setting: str = "fast",
    margin_mm: float = REGISTRATION_MARGIN_MM,
    seed: int = 42,
) -> TemplateRegistration:
    """Register the template to a subject (affine + optional SyN, antspyx) and warp the atlas.

    Both images are masked (the subject by ``subject_mask``, the template by
    :func:`template_region`, both plus ``margin_mm``) and registered on an isotropic grid (2 mm by
    default), which makes the result insensitive to thick slices, to the skull and to the neck; the
    transforms then map the 1 mm labels and the masks onto the subject's full-resolution grid.

    Parameters
    ----------
    subject : Nifti1Image
        Bias-corrected subject image (any grid; world mm are used).
    subject_mask : Nifti1Image
        Brain mask on the subject's grid.
    kit : TemplateKit
        From :func:`load_kit`.
    sequence : str
        Sequence of ``subject`` (``T1w``, ``T2w``, ``FLAIR``, ``SWI``) selecting the template image.
    setting : str
        Key of :data:`REGISTRATION_SETTINGS`.
    margin_mm : float
        Margin around both masks seen by the registration (mm; :data:`REGISTRATION_MARGIN_MM`).
    seed : int
        Random seed of the metric sampling.

    Returns
    -------
    TemplateRegistration
    """
    import ants

    if setting not in REGISTRATION_SETTINGS:
        raise ValueError(f"unknown registration setting {setting!r}")
    kind, syn_iters, grid_mm = REGISTRATION_SETTINGS[setting]
    started = time.monotonic()
    mask = np.asanyarray(subject_mask.dataobj) > 0
    if not mask.any():
        raise ImageError("brain mask is empty: cannot register the template")
    fixed, template = registration_inputs(subject, mask, kit, sequence, margin_mm)
    afix_full = nib_to_ants(fixed)
    afix = _resample_iso(afix_full, grid_mm)
    amov = _resample_iso(nib_to_ants(template), grid_mm)
    kwargs = {"aff_metric": "mattes", "aff_sampling": 32, "aff_random_sampling_rate": 0.25,
              "aff_iterations": (1000, 500, 250), "aff_shrink_factors": (4, 2, 1),
              "aff_smoothing_sigmas": (2, 1, 0)}
    if kind == "SyN":
        kwargs.update(syn_metric="mattes", syn_sampling=32, reg_iterations=syn_iters, flow_sigma=3, total_sigma=0)
    with ants_seeded(seed):  # antspyx ignores a random_seed= keyword
        try:
            reg = ants.registration(fixed=afix, moving=amov, type_of_transform=kind, **kwargs)
        except RuntimeError as exc:  # e.g. nothing but zeros inside a wrong brain mask
            LOGGER.warning("template registration failed (%s): header alignment kept, marked failed", exc)
            reg = None
    failed = reg is None
    if failed:
        reg = _identity_registration(amov, afix)
    fwd = reg["fwdtransforms"]
    affine_icv = _affine_icv_mm3(fwd, kit)
    fix_mask = _resample_iso(nib_to_ants(nib.Nifti1Image(mask.astype(np.float32), subject.affine)), grid_mm)
    fix_mask = fix_mask.new_image_like((fix_mask.numpy() > 0.5).astype(np.float32))
    identity = ants.resample_image_to_target(amov, afix, interp_type="linear")
    before, after = (_mattes(afix, moved, fix_mask) for moved in (identity, reg["warpedmovout"]))

    def warp(img: nib.Nifti1Image, interpolator: str) -> np.ndarray:
        out = ants.apply_transforms(afix_full, nib_to_ants(img), fwd, interpolator=interpolator)
        return out.numpy()

    ref = ants_to_nib(afix_full)
    if not np.allclose(ref.affine, subject.affine, atol=1e-3):  # the bridge is exact; guard it
        raise ImageError("internal error: template warp grid differs from the subject grid")
    labels = np.rint(warp(kit.labels, "genericLabel")).astype(np.uint8)
    icv = (warp(kit.images["icv"], "linear") >= 0.5).astype(np.uint8)
    brain = (warp(kit.images["brain"], "linear") >= 0.5).astype(np.uint8)
    gm = np.clip(warp(kit.images["GM"], "linear"), 0, 1).astype(np.float32)
    wm = np.clip(warp(kit.images["WM"], "linear"), 0, 1).astype(np.float32)
    warped = warp(template, "linear").astype(np.float32)
    dice = float(2 * (brain.astype(bool) & mask).sum() / max(int(brain.sum()) + int(mask.sum()), 1))
    ok = bool(after <= before + 0.01 * abs(before) + 1e-3 and dice >= 0.8 and not failed)
    for path in {*reg["fwdtransforms"], *reg["invtransforms"]}:  # antspyx's temporary transform files
        Path(path).unlink(missing_ok=True)

    def img(data, dtype):
        out = nib.Nifti1Image(np.asarray(data, dtype=dtype), subject.affine)
        out.set_data_dtype(dtype)
        return out

    return TemplateRegistration(
        labels=img(labels, np.uint8), icv_mask=img(icv, np.uint8), brain_mask=img(brain, np.uint8),
        gm=img(gm, np.float32), wm=img(wm, np.float32), warped=img(warped, np.float32),
        similarity_before=before, similarity_after=after, mask_dice=dice, ok=ok, sequence=sequence,
        transform=f"{kind}:{setting}", seconds=time.monotonic() - started, affine_icv_mm3=affine_icv,
    )


def _mattes(fixed, moving, mask) -> float:
    """Mattes mutual information inside ``mask`` (more negative is better); 0 (no information) when ITK cannot
    compute it, e.g. for an image that is constant inside the mask."""
    import ants

    try:
        return float(ants.image_similarity(fixed, moving, metric_type="MattesMutualInformation", fixed_mask=mask))
    except RuntimeError:
        return 0.0


def _identity_registration(amov, afix) -> dict:
    """What ``ants.registration`` returns, for the header alignment (an identity affine in a temporary file)."""
    import tempfile

    import ants

    with tempfile.NamedTemporaryFile(suffix=".mat", delete=False) as handle:
        path = handle.name
    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3), path)
    return {"fwdtransforms": [path], "invtransforms": [path],
            "warpedmovout": ants.resample_image_to_target(amov, afix, interp_type="linear")}


def _affine_icv_mm3(transforms: list[str], kit: TemplateKit) -> float | None:
    """The template's ICV divided by the volume scaling of the registration's affine part (mm³).

    ANTs' forward affine maps subject points to template points, so a subject head of volume V
    occupies ``V * |det A|`` in template space (Buckner et al. 2004's atlas scaling factor, the
    basis of FreeSurfer's eTIV). None when the transform list has no affine.
    """
    import ants

    mats = [t for t in transforms if t.endswith(".mat")]
    if not mats:
        return None
    matrix = np.asarray(ants.read_transform(mats[-1]).parameters[:9], dtype=float).reshape(3, 3)
    icv = kit.images["icv"]
    vox = float(abs(np.linalg.det(icv.affine[:3, :3])))
    return float((np.asanyarray(icv.dataobj) > 0.5).sum() * vox / abs(np.linalg.det(matrix)))


# ------------------------------------------------------------------- ICV and regions
#: Short name of the ICV method (benchmarks and tables).
ICV_METHOD_NAME = "template-warp-brain-restricted"
#: How :func:`intracranial_volume_mm3` is computed, for the brain-mask sidecar (``IcvMethod``).
ICV_METHOD = (f"{ICV_METHOD_NAME}: the ICBM152 2009a template, zero outside its intracranial mask, registered "
              "(affine + SyN, 2 mm) to the reference image zeroed outside its brain mask (no margin: neither "
              "skull, scalp nor neck is seen), its intracranial mask warped and united with the brain mask; "
              "QC.icv_affine_mm3 is the template ICV scaled by the affine part alone (eTIV-like cross-check)")


def intracranial_volume_mm3(icv_mask: np.ndarray, brain_mask: np.ndarray, voxel_mm3: float) -> float:
    """Intracranial volume (mm³): the warped template ICV mask united with the subject's brain mask.

    The union guarantees ICV >= brain-mask volume when the template's skull boundary falls
    inside a large brain.
    """
    return float(((np.asarray(icv_mask) > 0) | (np.asarray(brain_mask) > 0)).sum() * voxel_mm3)


def subject_regions(labels: np.ndarray, brain_mask: np.ndarray, table) -> np.ndarray:
    """Region labels restricted to the subject's brain; brain voxels with no region become ``other``.

    Parameters
    ----------
    labels : ndarray of int, shape (I, J, K)
        Warped atlas labels.
    brain_mask : ndarray of bool, shape (I, J, K)
    table : pandas.DataFrame
        Atlas table (needs the ``other`` region).

    Returns
    -------
    ndarray of uint8
        0 outside the brain mask.
    """
    other = int(table.loc[table["region"] == "other", "index"].iloc[0])
    brain = np.asarray(brain_mask) > 0
    out = np.where(brain, labels, 0).astype(np.uint8)
    out[brain & (out == 0)] = other
    return out


def assign_clusters(clusters: np.ndarray, regions: np.ndarray, n_clusters: int | None = None) -> np.ndarray:
    """Region index of every cluster by majority vote of its voxels.

    Ties go to the lower region index. Majority voting is used rather than the centroid because
    the centroid of a curved ePVS can fall outside the cluster (and so in another region).

    Parameters
    ----------
    clusters : ndarray of int, shape (I, J, K)
        Cluster index map (0 = background, 1..N clusters).
    regions : ndarray of int, shape (I, J, K)
        Region label map on the same grid.
    n_clusters : int, optional
        N (default ``clusters.max()``).

    Returns
    -------
    ndarray of int, shape (N,)
        Region index of cluster ``i + 1`` (0 when all its voxels are unlabelled).
    """
    clusters = np.asarray(clusters)
    n = int(clusters.max()) if n_clusters is None else int(n_clusters)
    if n == 0:
        return np.zeros(0, dtype=int)
    sel = clusters > 0
    c = clusters[sel].astype(np.int64)
    r = np.asarray(regions)[sel].astype(np.int64)
    n_regions = int(r.max()) + 1 if r.size else 1
    counts = np.bincount(c * n_regions + r, minlength=(n + 1) * n_regions).reshape(n + 1, n_regions)[1:]
    counts[:, 0] = np.where(counts[:, 1:].sum(1) > 0, -1, counts[:, 0])  # unlabelled only if nothing else
    return np.argmax(counts, axis=1)


def region_table(
    epvs: np.ndarray,
    clusters: np.ndarray,
    regions: np.ndarray,
    table,
    *,
    voxel_mm3: float,
    icv_mm3: float,
    cluster_volumes_mm3: np.ndarray | None = None,
):
    """Per-region ePVS measures (one row per region and hemisphere of the atlas table).

    Parameters
    ----------
    epvs : ndarray of bool, shape (I, J, K)
        ePVS mask.
    clusters : ndarray of int, shape (I, J, K)
        Cluster index map of ``epvs``.
    regions : ndarray of int, shape (I, J, K)
        Region labels on the same grid (see :func:`subject_regions`).
    table : pandas.DataFrame
        ``index``, ``name``, ``region``, ``hemisphere``.
    voxel_mm3 : float
        Voxel volume (mm³).
    icv_mm3 : float
        Intracranial volume (mm³).
    cluster_volumes_mm3 : ndarray, optional
        Volume of cluster ``i + 1``; computed from ``clusters`` when omitted.

    Returns
    -------
    pandas.DataFrame
        ``index``, ``name``, ``region``, ``hemisphere``, ``n_clusters`` (clusters assigned by
        majority voxel: each cluster counted once, in one region), ``n_clusters_touching`` (clusters
        with at least one voxel in the region: 0 exactly when ``volume_mm3`` is 0; a cluster that
        crosses a boundary counts in each region it touches), ``volume_mm3`` (ePVS voxels inside
        the region), ``volume_ppm_icv``
        (1e6 x volume / ICV), ``region_volume_mm3``, ``volume_fraction`` (ePVS volume / region
        volume) and ``mean_cluster_volume_mm3`` (mean full volume of the assigned clusters; n/a
        when none).
    """
    import pandas as pd

    if icv_mm3 <= 0:
        raise ValueError("intracranial volume must be positive")
    regions = np.asarray(regions).astype(np.int64)
    epvs = np.asarray(epvs) > 0
    n_idx = int(max(regions.max(initial=0), table["index"].max())) + 1
    region_vox = np.bincount(regions.ravel(), minlength=n_idx)
    epvs_vox = np.bincount(regions[epvs], minlength=n_idx)
    n = int(np.asarray(clusters).max(initial=0))
    owner = assign_clusters(clusters, regions, n)
    labelled = np.asarray(clusters) > 0
    pairs = np.unique(regions[labelled] * (n + 1) + np.asarray(clusters)[labelled].astype(np.int64))
    touching = np.bincount(pairs // (n + 1), minlength=n_idx)  # distinct clusters with a voxel in the region
    if cluster_volumes_mm3 is None:
        cluster_volumes_mm3 = np.bincount(np.asarray(clusters).ravel(), minlength=n + 1)[1:] * voxel_mm3
    cluster_volumes_mm3 = np.asarray(cluster_volumes_mm3, dtype=float)
    rows = []
    for _, row in table.iterrows():
        idx = int(row["index"])
        mine = owner == idx
        vol = float(epvs_vox[idx] * voxel_mm3)
        rvol = float(region_vox[idx] * voxel_mm3)
        rows.append({
            "index": idx, "name": row["name"], "region": row["region"], "hemisphere": row["hemisphere"],
            "n_clusters": int(mine.sum()), "n_clusters_touching": int(touching[idx]),
            "volume_mm3": vol, "volume_ppm_icv": 1e6 * vol / icv_mm3,
            "region_volume_mm3": rvol, "volume_fraction": vol / rvol if rvol > 0 else np.nan,
            "mean_cluster_volume_mm3": float(cluster_volumes_mm3[mine].mean()) if mine.any() else np.nan,
        })
    return pd.DataFrame(rows)


#: Column descriptions of the per-region table (BIDS TSV sidecar).
REGION_COLUMNS = {
    "index": {"Description": "Region label in the PVSregions and regions dseg images."},
    "name": {"Description": "Region and hemisphere, e.g. basal_ganglia_left."},
    "region": {"Description": "Anatomical region (see docs/atlas.md).", "Levels": {r: r for r in REGION_NAMES}},
    "hemisphere": {"Description": "left, right, or bilateral (midline regions and 'other')."},
    "n_clusters": {"Description": "ePVS clusters assigned to the region: the region holding most of the "
                                  "cluster's voxels (ties to the lower index); each cluster is counted in one "
                                  "region only, so the column sums to the unit's cluster count. A region can have "
                                  "n_clusters 0 and volume_mm3 > 0 (parts of clusters assigned elsewhere): use "
                                  "n_clusters_touching or volume_mm3 to tell whether a region has ePVS."},
    "n_clusters_touching": {"Description": "ePVS clusters with at least one voxel in the region; a cluster "
                                           "crossing a boundary counts in every region it touches. 0 exactly "
                                           "when volume_mm3 is 0."},
    "volume_mm3": {"Description": "ePVS volume inside the region, voxel-wise (every ePVS voxel counts in the "
                                  "region it lies in).", "Units": "mm^3"},
    "volume_ppm_icv": {"Description": "1e6 x volume_mm3 / intracranial volume (parts per million of ICV).",
                       "Units": "ppm"},
    "region_volume_mm3": {"Description": "Volume of the region within the brain mask.", "Units": "mm^3"},
    "volume_fraction": {"Description": "volume_mm3 / region_volume_mm3 (dimensionless)."},
    "mean_cluster_volume_mm3": {"Description": "Mean volume of the clusters assigned to the region (whole "
                                               "clusters, also their voxels outside it); n/a when none.",
                                "Units": "mm^3"},
}

#: Column descriptions of the regions dseg look-up table.
ATLAS_COLUMNS = {
    "index": {"Description": "Label value in the dseg image."},
    "name": {"Description": "Region and hemisphere."},
    "region": {"Description": "Anatomical region (see docs/atlas.md)."},
    "hemisphere": {"Description": "left, right or bilateral."},
}

"""Held-out anatomies for the synthetic ePVS engine: tissue maps of real brains other than the training one.

The training cases of :mod:`epvsseg.synth` are all rendered from the ICBM 2009a average
(:func:`epvsseg.synth.priors.icbm_tissue`). To measure accuracy on brains whose anatomy the networks
never saw, :func:`colin27_tissue` builds :class:`~epvsseg.synth.priors.TissueMaps` from a different,
real brain, which :func:`epvsseg.synth.priors.build_priors` then turns into priors::

    from epvsseg.synth import priors
    from epvsseg.synth.anatomies import colin27_tissue

    colin = priors.build_priors(1.0, tissue=colin27_tissue())

**Colin27** (Holmes et al. 1998): the average of 27 T1w scans of one healthy man, in MNI space,
brain-extracted (``ch2bet.nii.gz``, 181x217x181 voxels of 1 mm, RAS), from Debian's ``mricron-data``
package (``apt-get install mricron-data``; Debian lists the package as BSD-3-Clause, the image carries
the permissive MNI notice). It is read at run time and never shipped or cached in the repository.

Steps (:func:`colin27_tissue`):

1. brain mask: the non-zero support of ``ch2bet``, holes filled, largest connected part;
2. affine registration (antspyx, 12 parameters, Mattes mutual information, seeded) of the Colin27 T1w
   to the ICBM 2009a T1w template of the nilearn wheel, so that the MNI boxes and the CIT168 nuclei
   that :func:`~epvsseg.synth.priors.build_priors` places by world coordinates line up;
3. three-class Atropos segmentation (k-means initialisation, MRF smoothing 0.1, constant internal
   seed) of the native Colin27 T1w inside its mask: posterior probabilities of CSF, GM and WM (classes
   sorted by mean intensity);
4. GM, WM probabilities and the mask resampled (trilinear, through the affine) onto the ICBM 2009a
   1 mm grid; the mask is the resampled mask >= 0.5.

ITK runs single-threaded (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1``, set here when the variable is
unset; ITK reads it once per process), the registration sampling is seeded and Atropos uses its
constant seed, so two builds give identical maps.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .label_maps import largest_component
from .priors import TissueMaps, icbm_path

LOGGER = logging.getLogger(__name__)

#: Where Debian's ``mricron-data`` installs the brain-extracted Colin27 T1w.
COLIN27_DEBIAN_PATH = Path("/usr/share/mricron/templates/ch2bet.nii.gz")
#: Debian package that ships :data:`COLIN27_DEBIAN_PATH`.
COLIN27_APT_PACKAGE = "mricron-data"
#: Version of the Colin27 pipeline; part of the cache key (bump when the steps change).
COLIN27_PIPELINE_VERSION = "1"
#: Default seed of the registration's metric sampling.
COLIN27_SEED = 20270127
#: Atropos settings: MRF smoothing and neighbourhood, convergence (iterations, tolerance).
_ATROPOS_MRF = "[0.1,1x1x1]"
_ATROPOS_CONVERGENCE = "[5,0]"


def find_colin27(path: str | os.PathLike | None = None) -> Path:
    """Locate the brain-extracted Colin27 T1w.

    Parameters
    ----------
    path : path-like, optional
        Explicit file; default :data:`COLIN27_DEBIAN_PATH`.

    Returns
    -------
    Path

    Raises
    ------
    FileNotFoundError
        Naming the path looked at and the Debian package that provides it.
    """
    p = Path(path) if path is not None else COLIN27_DEBIAN_PATH
    if not p.is_file():
        raise FileNotFoundError(
            f"{p}: Colin27 brain-extracted T1w (ch2bet.nii.gz) not found; install the Debian package "
            f"{COLIN27_APT_PACKAGE} (apt-get install {COLIN27_APT_PACKAGE}, which provides "
            f"{COLIN27_DEBIAN_PATH}) or pass the file's path"
        )
    return p


def _compute_colin27(src: Path, seed: int) -> dict[str, np.ndarray]:
    """Registration + segmentation + resampling; arrays on the ICBM 2009a grid (see module docstring)."""
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    import ants

    from epvsprep.ops import ants_seeded, ants_to_nib, nib_to_ants

    img = nib.load(src)
    if img.ndim != 3:
        raise ValueError(f"{src}: expected a 3D T1w image, got shape {img.shape}")
    data = np.asarray(img.dataobj, np.float32)
    mask = largest_component(ndimage.binary_fill_holes(data > 0))
    if mask.sum() < 500_000:
        raise ValueError(f"{src}: brain mask (non-zero voxels) has only {int(mask.sum())} voxels; "
                         "expected the brain-extracted Colin27 (ch2bet)")
    data = np.where(mask, data, 0.0).astype(np.float32)
    t1_img = nib.load(icbm_path("t1"))
    fixed = nib_to_ants(t1_img)
    moving = nib_to_ants(nib.Nifti1Image(data, img.affine))
    amask = nib_to_ants(nib.Nifti1Image(mask.astype(np.float32), img.affine))

    with ants_seeded(seed):
        reg = ants.registration(fixed=fixed, moving=moving, type_of_transform="Affine")
    fwd = reg["fwdtransforms"]

    # r=0: Atropos seeds its internal random number generator with a constant (its default is a
    # random seed, which made two builds differ by up to 0.2 in a few thousand voxels)
    seg = ants.atropos(a=moving, x=amask, i="Kmeans[3]", m=_ATROPOS_MRF, c=_ATROPOS_CONVERGENCE, r=0)
    probs = seg["probabilityimages"]  # classes by increasing mean intensity: CSF, GM, WM
    means = [float(data[seg["segmentation"].numpy() == k].mean()) for k in (1, 2, 3)]
    if not means[0] < means[1] < means[2]:
        raise RuntimeError(f"{src}: Atropos classes are not ordered CSF < GM < WM on T1w (means {means})")
    out = {}
    for name, im in (("gm", probs[1]), ("wm", probs[2]), ("mask", amask)):
        warped = ants.apply_transforms(fixed, im, fwd, interpolator="linear")
        out[name] = ants_to_nib(warped).get_fdata(dtype=np.float32)
    for f in fwd:
        if str(f).startswith(tempfile.gettempdir()):
            Path(f).unlink(missing_ok=True)
    brain = out["mask"] >= 0.5
    gm = np.where(brain, np.clip(out["gm"], 0.0, 1.0), 0.0).astype(np.float32)
    wm = np.where(brain, np.clip(out["wm"], 0.0, 1.0), 0.0).astype(np.float32)
    return {"gm": gm, "wm": wm, "brain_mask": brain, "affine": np.asarray(t1_img.affine, float)}


def colin27_tissue(path: str | os.PathLike | None = None, *, seed: int = COLIN27_SEED,
                   cache_dir: str | os.PathLike | None = None) -> TissueMaps:
    """Tissue maps of Colin27, a real brain the synthetic training data never used.

    Parameters
    ----------
    path : path-like, optional
        Brain-extracted Colin27 T1w; default :data:`COLIN27_DEBIAN_PATH` (Debian ``mricron-data``).
    seed : int
        Seed of the registration's metric sampling.
    cache_dir : path-like, optional
        Folder where the maps are cached (``colin27_<key>.npz``, key = sha256 of the input file,
        the pipeline version and the seed); written atomically. Nothing is cached by default.

    Returns
    -------
    TissueMaps
        On the ICBM 2009a 1 mm grid (197x233x189, RAS, MNI mm), ``name="colin27"``; GM and WM are
        Atropos posteriors in [0, 1], zero outside ``brain_mask``.

    Raises
    ------
    FileNotFoundError
        When the Colin27 file is missing (the message names the path and the apt package).
    ValueError
        When the file is not a plausible brain-extracted 3D T1w.

    Notes
    -----
    Takes about 65 s on one CPU thread (registration about 40 s, Atropos about 25 s).
    """
    src = find_colin27(path)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    key = hashlib.sha256(f"{digest}:{COLIN27_PIPELINE_VERSION}:{int(seed)}".encode()).hexdigest()[:16]
    sources = {"colin27": str(src), "colin27_sha256": digest,
               "colin27_pipeline": f"v{COLIN27_PIPELINE_VERSION} affine->ICBM2009a, Atropos 3-class, seed {seed}",
               "icbm2009a": str(icbm_path("t1").parent)}
    cache = Path(cache_dir) / f"colin27_{key}.npz" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            arrays = {k: z[k] for k in ("gm", "wm", "brain_mask", "affine")}
        LOGGER.info("Colin27 tissue maps read from the cache %s", cache)
    else:
        started = time.monotonic()
        arrays = _compute_colin27(src, int(seed))
        LOGGER.info("Colin27 tissue maps built in %.1f s", time.monotonic() - started)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".colin27_", suffix=".npz.part")
            try:
                with os.fdopen(fd, "wb") as fh:
                    np.savez_compressed(fh, **arrays)
                os.replace(tmp, cache)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    return TissueMaps(gm=arrays["gm"].astype(np.float32), wm=arrays["wm"].astype(np.float32),
                      brain_mask=arrays["brain_mask"].astype(bool), affine=arrays["affine"],
                      name="colin27", sources=sources)

"""Per-case anatomy: output grids, random smooth deformations, and sampling of the priors.

Spaces
------
*template* : MNI mm of :class:`~epvsseg.synth.priors.AnatomyPriors` (RAS).
*subject*  : world mm of the rendered case (RAS); the output grid lives here.

A case maps a subject point ``x`` (mm) to the template by a small affine plus a smooth
displacement (pull-back)::

    t(x) = T_aff @ x + D(x),     D(x) = sum_m a_m * sin(k_m . x + phi_m)

with ``a_m`` (mm), ``k_m`` (rad/mm) and ``phi_m`` (rad) drawn in :func:`sample_deformation` and
stored in the case parameters (a sum of random Fourier modes: smooth everywhere, cheap to
evaluate at any point, identical for a crop and for the whole brain). Points drawn in the
template (ePVS centrelines, lesion centres) are pushed to the subject by inverting ``t`` with
a fixed-point iteration.

Arrays follow nibabel voxel order (i, j, k); point arrays are (N, 3) in mm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

LOGGER = logging.getLogger(__name__)

#: Centre (MNI mm) about which the random affine rotates and scales the brain.
BRAIN_CENTRE_MM = (0.0, -18.0, 10.0)


def rotation_matrix(degrees_xyz: Sequence[float]) -> np.ndarray:
    """3x3 rotation from Euler angles (degrees) about x, then y, then z (RAS axes)."""
    ax, ay, az = np.radians(np.asarray(degrees_xyz, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def sample_deformation(rng: np.random.Generator, *, max_rotation_deg: float = 8.0,
                       scale_range: tuple[float, float] = (0.9, 1.1),
                       max_shift_mm: float = 4.0, rms_disp_mm: tuple[float, float] = (0.5, 2.5),
                       n_modes: int = 10, wavelength_mm: tuple[float, float] = (35.0, 110.0)) -> dict:
    """Draw a random affine and smooth non-linear deformation (JSON-serialisable).

    Parameters
    ----------
    rng : numpy.random.Generator
    max_rotation_deg : float
        Largest rotation about each axis, degrees.
    scale_range : tuple of float
        Range of the global brain scale (each axis varies a further +-3 %).
    max_shift_mm : float
        Largest translation per axis, mm.
    rms_disp_mm : tuple of float
        Range of the RMS non-linear displacement, mm.
    n_modes : int
        Number of Fourier modes of the displacement field.
    wavelength_mm : tuple of float
        Range of the mode wavelengths, mm.

    Returns
    -------
    dict
        ``rotation_deg`` (3), ``scale`` (3), ``shift_mm`` (3), ``modes`` with ``k`` (n, 3) rad/mm,
        ``phase`` (n,) rad and ``amp_mm`` (n, 3).
    """
    glob = rng.uniform(*scale_range)
    scale = glob * rng.uniform(0.97, 1.03, 3)
    direction = rng.normal(size=(n_modes, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    wavelength = np.exp(rng.uniform(np.log(wavelength_mm[0]), np.log(wavelength_mm[1]), n_modes))
    k = direction * (2 * np.pi / wavelength)[:, None]
    amp = rng.normal(size=(n_modes, 3))
    rms = float(np.sqrt((amp ** 2).sum() / 2.0))
    amp *= rng.uniform(*rms_disp_mm) / max(rms, 1e-9)
    return {
        "rotation_deg": rng.uniform(-max_rotation_deg, max_rotation_deg, 3).round(4).tolist(),
        "scale": scale.round(5).tolist(),
        "shift_mm": rng.uniform(-max_shift_mm, max_shift_mm, 3).round(4).tolist(),
        "modes": {
            "k": k.round(6).tolist(),
            "phase": rng.uniform(0, 2 * np.pi, n_modes).round(6).tolist(),
            "amp_mm": amp.round(5).tolist(),
        },
    }


class Deformation:
    """Subject -> template mapping of one case (see the module docstring).

    Parameters
    ----------
    spec : dict
        Output of :func:`sample_deformation`.
    """

    def __init__(self, spec: dict) -> None:
        c = np.asarray(BRAIN_CENTRE_MM)
        lin = rotation_matrix(spec["rotation_deg"]) @ np.diag(1.0 / np.asarray(spec["scale"], float))
        self.matrix = np.eye(4)
        self.matrix[:3, :3] = lin
        self.matrix[:3, 3] = c - lin @ c + np.asarray(spec["shift_mm"], float)
        self.inverse = np.linalg.inv(self.matrix)
        modes = spec["modes"]
        self.k = np.asarray(modes["k"], np.float64).reshape(-1, 3)
        self.phase = np.asarray(modes["phase"], np.float64)
        self.amp = np.asarray(modes["amp_mm"], np.float64).reshape(-1, 3)

    def displacement(self, x: np.ndarray) -> np.ndarray:
        """Displacement D(x), mm, at subject points ``x`` (N, 3) mm; returns (N, 3)."""
        arg = np.asarray(x, np.float64) @ self.k.T + self.phase
        return (np.sin(arg) @ self.amp).astype(np.float64)

    def to_template(self, x: np.ndarray) -> np.ndarray:
        """Template mm of subject points ``x`` (N, 3) mm."""
        x = np.asarray(x, np.float64)
        return x @ self.matrix[:3, :3].T + self.matrix[:3, 3] + self.displacement(x)

    def to_subject(self, t: np.ndarray, iterations: int = 12) -> np.ndarray:
        """Subject mm of template points ``t`` (N, 3) mm (fixed-point inverse of :meth:`to_template`)."""
        t = np.asarray(t, np.float64)
        inv_lin, inv_off = self.inverse[:3, :3], self.inverse[:3, 3]
        x = t @ inv_lin.T + inv_off
        for _ in range(iterations):
            x = (t - self.displacement(x)) @ inv_lin.T + inv_off
        return x

    def template_voxels(self, grid_affine: np.ndarray, shape: tuple[int, int, int],
                        priors_affine: np.ndarray) -> np.ndarray:
        """Template voxel coordinates of every output voxel centre.

        On an axis-aligned grid each Fourier mode is separable,
        ``sin(k.x + phi) = Im(e^{i phi} e^{i k_x x} e^{i k_y y} e^{i k_z z})``, so the exact
        displacement is a small complex tensor contraction.

        Parameters
        ----------
        grid_affine : ndarray, shape (4, 4)
            Axis-aligned output voxel -> subject mm.
        shape : tuple of int
            Output grid shape (I, J, K), voxels.
        priors_affine : ndarray, shape (4, 4)
            Prior voxel -> template mm.

        Returns
        -------
        ndarray, shape (3, I, J, K), float32
            Fractional template voxel indices.
        """
        p_inv = np.linalg.inv(priors_affine)
        lin = p_inv[:3, :3] @ self.matrix[:3, :3] @ grid_affine[:3, :3]
        off = p_inv[:3, :3] @ (self.matrix[:3, :3] @ grid_affine[:3, 3] + self.matrix[:3, 3]) + p_inv[:3, 3]
        axes = [grid_affine[a, a] * np.arange(n) + grid_affine[a, 3] for a, n in enumerate(shape)]
        # per axis (M, n): e^{i k_a x_a}
        waves = [np.exp(1j * np.outer(self.k[:, a], axes[a])).astype(np.complex64) for a in range(3)]
        amp_vox = self.amp @ p_inv[:3, :3].T  # (M, 3): displacement in template voxels
        phase = np.exp(1j * self.phase).astype(np.complex64)
        out = np.empty((3, *shape), np.float32)
        idx = [np.arange(n, dtype=np.float32) for n in shape]
        for a in range(3):
            coef = (amp_vox[:, a] * phase).astype(np.complex64)  # (M,)
            ij = np.einsum("m,mi,mj->ijm", coef, waves[0], waves[1]).reshape(-1, len(coef))
            d = (ij @ waves[2]).imag.reshape(shape)
            out[a] = (d + np.float32(off[a]) + np.float32(lin[a, 0]) * idx[0][:, None, None]
                      + np.float32(lin[a, 1]) * idx[1][None, :, None]
                      + np.float32(lin[a, 2]) * idx[2][None, None, :])
        return out


def trilinear(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of a channels-last volume at fractional voxel coordinates.

    Parameters
    ----------
    volume : ndarray, shape (I, J, K, C)
        Any numeric dtype (e.g. ``uint8`` quantised fractions).
    coords : ndarray, shape (3, ...)
        Fractional voxel indices (i, j, k). Outside the grid the volume is taken as 0.

    Returns
    -------
    ndarray, shape (..., C), float32
        In the units of ``volume``.
    """
    shp = volume.shape[:3]
    flat = volume.reshape(-1, volume.shape[3])
    c = coords.reshape(3, -1)
    out = np.empty((c.shape[1], volume.shape[3]), np.float32)
    chunk = 1 << 17  # points per block: keeps the temporaries in cache
    for start in range(0, c.shape[1], chunk):
        out[start:start + chunk] = _trilinear_block(flat, shp, c[:, start:start + chunk])
    return out.reshape((*coords.shape[1:], volume.shape[3]))


def _trilinear_block(flat: np.ndarray, shp: tuple[int, ...], c: np.ndarray) -> np.ndarray:
    strides = (shp[1] * shp[2], shp[2], 1)
    parts = []  # per axis: [(flat offset, weight) for the lower and upper neighbour]
    for a in range(3):
        base = np.floor(c[a])
        f = (c[a] - base).astype(np.float32)
        base = base.astype(np.int64)
        opts = []
        for off, w in ((0, 1.0 - f), (1, f)):
            idx = base + off
            ok = (idx >= 0) & (idx < shp[a])
            opts.append((np.clip(idx, 0, shp[a] - 1) * strides[a], np.where(ok, w, np.float32(0.0))))
        parts.append(opts)
    out = np.zeros((c.shape[1], flat.shape[1]), np.float32)
    tmp = np.empty_like(out)
    for corner in range(8):
        (li, wi), (lj, wj), (lk, wk) = (parts[a][(corner >> (2 - a)) & 1] for a in range(3))
        w = wi * wj * wk
        np.multiply(flat[li + lj + lk], w[:, None], out=tmp)
        out += tmp
    return out


def grid_affine(voxel_mm: Sequence[float], shape: Sequence[int], centre_mm: Sequence[float]) -> np.ndarray:
    """Axis-aligned RAS grid (voxel -> mm) of voxel size ``voxel_mm`` (mm) and ``shape`` (voxels),
    centred on ``centre_mm``."""
    vox = np.asarray(voxel_mm, float)
    aff = np.diag([*vox, 1.0])
    aff[:3, 3] = np.asarray(centre_mm, float) - vox * (np.asarray(shape, float) - 1) / 2.0
    return aff


def world_points(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """World mm of every voxel centre of an axis-aligned grid, shape (I, J, K, 3), float32."""
    axes = [affine[a, a] * np.arange(n, dtype=np.float32) + affine[a, 3] for a, n in enumerate(shape)]
    pts = np.empty((*shape, 3), np.float32)
    pts[..., 0] = axes[0][:, None, None]
    pts[..., 1] = axes[1][None, :, None]
    pts[..., 2] = axes[2][None, None, :]
    return pts

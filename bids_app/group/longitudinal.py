"""Cluster matching through every session: persisting, new, vanished and reappearing ePVS clusters.

For every participant with two or more sessions, each session's bias-corrected reference image
(``desc-preproc``) is registered rigidly to the *previous* session's
(:func:`epvsprep.ops.register_rigid`, Mattes mutual information, restricted to the previous
session's brain mask) and its cluster map is carried onto the previous session's grid with
nearest-neighbour interpolation: ses-1 -> ses-2 -> ses-3 ... A cluster and a cluster of the next
session *match* when they share at least one voxel after the transfer, or when their centroids (mm)
lie within ``tolerance_mm`` of each other (small clusters can vanish in the nearest-neighbour
transfer). Matches chain into *tracks* (:func:`track_clusters`): a cluster missing from the
previous session but within ``tolerance_mm`` of a track's last position (carried to the first
session's space by the composed registrations) continues that track (*reappears*). A cluster's
region is the majority label of its voxels in the unit's ``seg-PVSregions`` map (whole brain only
when the unit has none).

``mode="header"`` skips the registration and uses the images' scanner coordinates as they are
(for sessions already in one space); ``mode="none"`` skips matching. The participant level
writes no between-session transform, so the registrations are computed here (one per consecutive
pair).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from . import maps
from .collect import WHOLE_BRAIN, Unit, _read_tsv

LOGGER = logging.getLogger(__name__)

MODES = ("rigid", "header", "none")

#: Default centroid tolerance (mm) for matching clusters across sessions.
TOLERANCE_MM = 2.0


@dataclass(frozen=True)
class Transfer:
    """A follow-up cluster map on the baseline grid, and how it got there.

    ``labels``: the follow-up map resampled onto the baseline grid (int64), or None when the
    voxel-to-voxel map is the identity (the follow-up's own voxels are used as they are).
    ``matrix`` maps baseline scanner coordinates (mm) to follow-up scanner coordinates (mm).
    """

    labels: np.ndarray | None
    matrix: np.ndarray
    method: str
    ok: bool
    similarity_before: float
    similarity_after: float


def transfer_clusters(baseline: Unit, followup: Unit, mode: str, seed: int = 42, *,
                      loaded: tuple | None = None) -> Transfer:
    """Carry the follow-up cluster map onto the baseline grid (see the module docstring).

    ``loaded``: the two sessions' :class:`SessionClusters`, when already read (saves two reads).
    When the voxel-to-voxel map is the identity (header mode, one grid) nothing is resampled.
    """
    prev, cur = loaded if loaded is not None else (read_clusters(baseline), read_clusters(followup))
    matrix = np.eye(4)
    ok, before, after, method = True, math.nan, math.nan, "header"
    if mode == "rigid":
        from epvsprep import ops

        fixed_path, moving_path = baseline.existing("preproc"), followup.existing("preproc")
        if fixed_path is None or moving_path is None:
            missing = (baseline if fixed_path is None else followup).paths["preproc"]
            raise FileNotFoundError(f"{missing}: missing; it is needed to register the sessions")
        mask_path = baseline.existing("brain_mask")
        fixed_mask = nib.load(str(mask_path)) if mask_path is not None else None
        res = ops.register_rigid(nib.load(str(moving_path)), nib.load(str(fixed_path)), fixed_mask=fixed_mask,
                                 seed=seed)
        matrix, ok, before, after, method = res.matrix, res.ok, res.similarity_before, res.similarity_after, "rigid"
    vox = np.linalg.inv(cur.affine) @ matrix @ prev.affine
    if cur.shape == prev.shape and np.allclose(vox, np.eye(4), atol=1e-6):
        return Transfer(None, matrix, method, bool(ok), float(before), float(after))
    moved = ndimage.affine_transform(cur.dense(), vox[:3, :3], offset=vox[:3, 3], output_shape=prev.shape,
                                     order=0, mode="constant", cval=0)
    return Transfer(moved.astype(np.int64), matrix, method, bool(ok), float(before), float(after))


@dataclass
class SessionClusters:
    """The clusters of one session.

    The grid (``shape``, ``affine``), the Fortran-order linear indices of its labelled voxels
    (``flat``, sorted; nibabel's voxel order) and their labels (``lab``); per cluster: ``ids``,
    ``centroids`` (own scanner mm, shape (n, 3)), ``volumes`` (mm³) and ``regions`` (names).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    flat: np.ndarray
    lab: np.ndarray
    ids: np.ndarray
    centroids: np.ndarray
    volumes: np.ndarray
    regions: list[str]

    def dense(self) -> np.ndarray:
        """The cluster map as an int32 array of ``shape`` (nibabel voxel order)."""
        out = np.zeros(self.shape, np.int32, order="F")
        out.ravel(order="K")[self.flat] = self.lab
        return out


def read_clusters(unit: Unit) -> SessionClusters:
    """Describe each cluster of a unit in one pass over its labelled voxels (:class:`~bids_app.group.maps.UnitMaps`:
    the unit's voxel lists, else its cluster and region images)."""
    unit_maps = maps.UnitMaps(unit, atlas=False)
    grid, flat, lab = unit_maps.clusters()
    counts = np.bincount(lab) if lab.size else np.zeros(1, np.int64)
    ids = np.flatnonzero(counts)
    ids = ids[ids > 0]
    affine = grid.affine
    if len(ids):
        ijk = np.unravel_index(flat, grid.shape, order="F")
        cen = np.stack([np.bincount(lab, weights=ax.astype(float))[ids] / counts[ids] for ax in ijk], 1)
        cen = cen @ affine[:3, :3].T + affine[:3, 3]
    else:
        cen = np.zeros((0, 3))
    volumes = counts[ids] * abs(float(np.linalg.det(affine[:3, :3])))
    regions = [WHOLE_BRAIN] * len(ids)
    region_tsv = unit.existing("epvs_regions_tsv")
    reg = unit_maps.epvs_regions_at(flat, grid.shape) if region_tsv is not None and len(ids) else None
    if reg is not None:
        table = _read_tsv(region_tsv, ("index", "name"))
        names = dict(zip(table["index"].astype(int), table["name"].astype(str)))
        votes = np.zeros((int(lab.max()) + 1, int(reg.max()) + 1), np.int64)
        np.add.at(votes, (lab, reg), 1)
        votes[:, 0] = 0  # voxels outside every region do not vote
        best = votes.argmax(1)
        regions = [names.get(int(best[c]), "other") if votes[c, best[c]] > 0 else "other" for c in ids]
    return SessionClusters(grid.shape, affine, flat, lab, ids, cen, volumes, regions)


def matched_pairs(prev: SessionClusters, cur: SessionClusters, tr: Transfer,
                  tolerance_mm: float = TOLERANCE_MM) -> set[tuple[int, int]]:
    """(previous id, current id) pairs that share a voxel after the transfer or whose centroids
    lie within ``tolerance_mm`` (in the previous session's space)."""
    if tr.labels is None:
        flat_m, lab_m = cur.flat, cur.lab
    else:
        moved = tr.labels.ravel(order="F")
        flat_m = np.flatnonzero(moved)
        lab_m = moved[flat_m]
    _, i_prev, i_cur = np.intersect1d(prev.flat, flat_m, assume_unique=True, return_indices=True)
    pairs = set(zip(prev.lab[i_prev].tolist(), lab_m[i_cur].astype(np.int64).tolist()))
    if len(prev.ids) and len(cur.ids):
        from scipy.spatial import cKDTree

        cur_in_prev = (np.c_[cur.centroids, np.ones(len(cur.ids))] @ np.linalg.inv(tr.matrix).T)[:, :3]
        near = cKDTree(cur_in_prev).query_ball_point(prev.centroids, r=tolerance_mm)
        pairs |= {(int(prev.ids[i]), int(cur.ids[j])) for i, js in enumerate(near) for j in js}
    return pairs


def pair_summary(prev: SessionClusters, cur: SessionClusters, pairs: set, tr: Transfer) -> pd.DataFrame:
    """Per region: clusters of both sessions, persisting, vanished and new (see :func:`match_sessions`)."""
    p_matched = {a for a, _ in pairs}
    c_matched = {b for _, b in pairs}
    names = [WHOLE_BRAIN] + sorted({*prev.regions, *cur.regions} - {WHOLE_BRAIN})
    rows = []
    for name in names:
        p_sel = [int(c) for c, r in zip(prev.ids, prev.regions) if name == WHOLE_BRAIN or r == name]
        c_sel = [int(c) for c, r in zip(cur.ids, cur.regions) if name == WHOLE_BRAIN or r == name]
        persisting = sum(c in p_matched for c in p_sel)
        rows.append({"name": name, "n_baseline": len(p_sel), "n_followup": len(c_sel), "persisting": persisting,
                     "vanished": len(p_sel) - persisting, "new": sum(c not in c_matched for c in c_sel),
                     "method": tr.method, "registration_ok": tr.ok, "mi_before": tr.similarity_before,
                     "mi_after": tr.similarity_after})
    return pd.DataFrame(rows)


def match_sessions(baseline: Unit, followup: Unit, *, mode: str = "rigid", tolerance_mm: float = TOLERANCE_MM,
                   seed: int = 42) -> pd.DataFrame:
    """Persisting, new and vanished clusters of ``followup`` relative to ``baseline``, per region.

    Returns
    -------
    DataFrame
        One row per region name (``whole_brain`` first): ``n_baseline``, ``n_followup``,
        ``persisting`` (baseline clusters with a match), ``vanished``, ``new``, and the
        registration's ``method``, ``registration_ok``, ``mi_before``, ``mi_after`` (Mattes MI,
        more negative is better).
    """
    prev, cur = read_clusters(baseline), read_clusters(followup)
    tr = transfer_clusters(baseline, followup, mode, seed, loaded=(prev, cur))
    return pair_summary(prev, cur, matched_pairs(prev, cur, tr, tolerance_mm), tr)


#: Trajectory categories of a cluster track over the sessions of a series.
TRAJECTORIES = ("persistent", "vanishes", "appears", "transient", "reappears")


def trajectory(presence: str) -> str:
    """Category of a presence pattern (``"++-+"``: present at sessions 1, 2 and 4).

    ``persistent`` (every session), ``vanishes`` (present from the first session, absent from
    some session on), ``appears`` (absent at first, present from some session to the last),
    ``transient`` (appears after the first and vanishes before the last), ``reappears`` (absent
    at a session between two where it is present).
    """
    first, last = presence.index("+"), presence.rindex("+")
    if "-" in presence[first:last + 1]:
        return "reappears"
    starts, ends = first == 0, last == len(presence) - 1
    return {(True, True): "persistent", (True, False): "vanishes", (False, True): "appears",
            (False, False): "transient"}[(starts, ends)]


def _assign_tracks(clusters: list[SessionClusters], pairs: list[set], to_first: list[np.ndarray],
                   tolerance_mm: float) -> list[dict[int, int]]:
    """Track number of every cluster of every session (``track[j][cluster id]``)."""
    track = [{int(c): t for t, c in enumerate(clusters[0].ids)}]
    n_tracks = len(track[0])
    last_seen: dict[int, tuple[int, np.ndarray]] = {}  # track -> (session, centroid in first-session mm)

    def remember(j):
        cen0 = (np.c_[clusters[j].centroids, np.ones(len(clusters[j].ids))] @ to_first[j].T)[:, :3]
        for c, xyz in zip(clusters[j].ids, cen0):
            last_seen[track[j][int(c)]] = (j, xyz)
        return cen0

    remember(0)
    for j in range(1, len(clusters)):
        cur, mapping = clusters[j], {}
        for a, b in sorted(pairs[j - 1]):
            t_new = track[j - 1][a]
            t_old = mapping.setdefault(b, t_new)
            if t_old != t_new:  # two tracks merge into one cluster: keep the older number
                keep, drop = min(t_old, t_new), max(t_old, t_new)
                last_seen.pop(drop, None)
                for tj in track:
                    for c, t in tj.items():
                        if t == drop:
                            tj[c] = keep
                mapping = {c: keep if t == drop else t for c, t in mapping.items()}
        cen0 = (np.c_[cur.centroids, np.ones(len(cur.ids))] @ to_first[j].T)[:, :3]
        gone = [t for t, (sj, _) in last_seen.items() if sj < j - 1]
        for c, xyz in zip(cur.ids, cen0):
            if int(c) in mapping:
                continue
            dist = [(float(np.linalg.norm(last_seen[t][1] - xyz)), t) for t in gone]
            close = [d for d in dist if d[0] <= tolerance_mm]
            if close:
                mapping[int(c)] = min(close)[1]
            else:
                mapping[int(c)], n_tracks = n_tracks, n_tracks + 1
        track.append(mapping)
        remember(j)
    return track


def track_clusters(units: list[Unit], sessions: list[str], *, mode: str = "rigid",
                   tolerance_mm: float = TOLERANCE_MM, seed: int = 42) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Chain cluster matches through every session of one series (see the module docstring).

    Parameters
    ----------
    units : list of Unit
        The series' units in session order (two or more).
    sessions : list of str
        Their session labels.

    Returns
    -------
    tracks : DataFrame
        One row per cluster track: ``track``, ``name`` (region at its first appearance),
        ``presence`` (``"+-+"``: one character per session, ``+`` present), ``trajectory`` (:data:`TRAJECTORIES`),
        ``n_present``, ``first_session``, ``last_session``, ``volume_first_mm3``,
        ``volume_last_mm3`` (at the first and last sessions where present; a track that merges
        clusters sums their volumes).
    pairs : DataFrame
        One row per consecutive session pair and region (:func:`pair_summary`) with
        ``baseline_session`` (the earlier session) and ``followup_session``.
    """
    clusters = [read_clusters(u) for u in units]
    to_first, pair_sets, summaries = [np.eye(4)], [], []
    for j in range(1, len(units)):
        tr = transfer_clusters(units[j - 1], units[j], mode, seed, loaded=(clusters[j - 1], clusters[j]))
        # to_first[j] maps session-j mm to first-session mm; tr.matrix maps previous mm to current mm
        to_first.append(to_first[j - 1] @ np.linalg.inv(tr.matrix))
        pair_sets.append(matched_pairs(clusters[j - 1], clusters[j], tr, tolerance_mm))
        summary = pair_summary(clusters[j - 1], clusters[j], pair_sets[-1], tr)
        summary.insert(0, "followup_session", sessions[j])
        summary.insert(0, "baseline_session", sessions[j - 1])
        summaries.append(summary)
    track = _assign_tracks(clusters, pair_sets, to_first, tolerance_mm)
    per_track: dict[int, dict] = {}
    for j, (sc, tj) in enumerate(zip(clusters, track)):
        for c, vol, reg in zip(sc.ids, sc.volumes, sc.regions):
            rec = per_track.setdefault(tj[int(c)], {"name": reg, "volume": {}})
            rec["volume"][j] = rec["volume"].get(j, 0.0) + float(vol)
    rows = []
    for number, (t, rec) in enumerate(sorted(per_track.items(), key=lambda kv: min(kv[1]["volume"]))):
        present = sorted(rec["volume"])
        presence = "".join("+" if j in rec["volume"] else "-" for j in range(len(units)))
        rows.append({"track": number + 1, "name": rec["name"], "presence": presence,
                     "trajectory": trajectory(presence), "n_present": len(present),
                     "first_session": sessions[present[0]], "last_session": sessions[present[-1]],
                     "volume_first_mm3": rec["volume"][present[0]], "volume_last_mm3": rec["volume"][present[-1]]})
    cols = ["track", "name", "presence", "trajectory", "n_present", "first_session", "last_session",
            "volume_first_mm3", "volume_last_mm3"]
    return pd.DataFrame(rows, columns=cols), pd.concat(summaries, ignore_index=True)


def persistence_rates(tracks: pd.DataFrame) -> pd.DataFrame:
    """Per region: cluster tracks by trajectory and the persistence rate.

    Parameters
    ----------
    tracks : DataFrame
        Tracks of every series (:func:`track_clusters` with ``participant_id``).

    Returns
    -------
    DataFrame
        One row per region (``whole_brain`` first, all tracks): ``n_participants``, ``n_tracks``,
        one count per :data:`TRAJECTORIES` category, ``n_first`` (tracks present at the first
        session) and ``persistence_rate`` = persistent / ``n_first`` (fraction of first-session
        clusters seen at every later session; NaN without any).
    """
    cols = ["name", "n_participants", "n_tracks", *TRAJECTORIES, "n_first", "persistence_rate"]
    if tracks.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for name in [WHOLE_BRAIN] + sorted(set(tracks["name"]) - {WHOLE_BRAIN}):
        sub = tracks if name == WHOLE_BRAIN else tracks.loc[tracks["name"] == name]
        counts = sub["trajectory"].value_counts()
        n_first = int(sub["presence"].str.startswith("+").sum())
        persistent = int(counts.get("persistent", 0))
        rows.append({"name": name, "n_participants": int(sub["participant_id"].nunique()), "n_tracks": len(sub),
                     **{k: int(counts.get(k, 0)) for k in TRAJECTORIES}, "n_first": n_first,
                     "persistence_rate": persistent / n_first if n_first else math.nan})
    return pd.DataFrame(rows, columns=cols)

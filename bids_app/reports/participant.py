"""Participant report: reportlet figures written to disk, then assembled into one HTML file.

Figures are PNG files under ``<out>/sub-<label>/figures/`` (reportlets); the HTML
report inlines them (base64), and it can be rebuilt from the files on disk.

The report's interactive viewer and cluster review (``docs/review.md``) work from a file on
disk, with no server and no network: the viewer library (NiiVue, vendored in
``bids_app/data/viewer/``) is written once per output folder (``<out>/figures/``), and each
unit's images are a classic script beside its figures (``<stem>_desc-<combination>_viewer.js``),
small uint8/uint16 NIfTI volumes cropped to the brain, gzip- and base64-encoded. A report
copied with its output folder keeps working; the report alone still shows its figures and tables.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import html
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..derivatives import atomic_path, write_text

LOGGER = logging.getLogger(__name__)


def _window(img: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    values = img[mask] if mask is not None and mask.any() else img[img > 0]
    if values.size == 0:
        values = img.ravel()
    lo, hi = np.percentile(values, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def _bbox(mask: np.ndarray, pad: int = 4) -> tuple[slice, slice]:
    idx = np.argwhere(mask.any(axis=2))
    if idx.size == 0:
        return slice(None), slice(None)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, mask.shape[:2])
    return slice(lo[0], hi[0]), slice(lo[1], hi[1])


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi, facecolor="black", bbox_inches="tight", pad_inches=0.05)
    return path


def axial_slices(mask: np.ndarray, n: int, lo: float = 0.30, hi: float = 0.85) -> list[int]:
    """``n`` axial (k) indices spread over the ``lo``-``hi`` fraction of the brain's extent.

    The default range runs from the basal ganglia to the centrum semiovale on a RAS+ grid.
    """
    ks = np.flatnonzero(mask.any(axis=(0, 1)))
    if ks.size == 0:
        return [mask.shape[2] // 2] * n
    first, last = ks.min(), ks.max()
    return sorted({round(float(first + f * (last - first))) for f in np.linspace(lo, hi, n)})


def make_figures(
    *,
    paths: Mapping[str, Path],
    reference: np.ndarray,
    mask: np.ndarray,
    epvs: np.ndarray,
    affine: np.ndarray,
    ref_sequence: str,
    coregistered: Mapping[str, np.ndarray] | None = None,
    regions: np.ndarray | None = None,
    region_names: Mapping[int, str] | None = None,
) -> dict[str, Path]:
    """Render the participant's reportlets to PNG files.

    Parameters
    ----------
    paths : mapping
        Figure key of the outputs' contract (``figure_epvs``, ``figure_zoom``, ``figure_mask``,
        ``figure_coreg``, ``figure_regions``) -> PNG path (:func:`bids_app.io_spec.unit_paths`).
    reference, mask, epvs : ndarray, shape (I, J, K)
        Preprocessed reference image, brain mask and ePVS mask on the RAS+ working grid.
    affine : ndarray, shape (4, 4)
        Voxel-to-mm affine of that grid (used for the aspect ratio of anisotropic voxels).
    ref_sequence : str
        Sequence of the reference (figure titles).
    coregistered : mapping, optional
        Other sequences resampled onto the reference grid (registration check figure).
    regions : ndarray of int, shape (I, J, K), optional
        Region labels warped from the template (regions figure).
    region_names : mapping, optional
        Label -> name, for the figure legend.

    Returns
    -------
    dict
        Figure key -> PNG path (``figure_coreg`` only with other sequences, ``figure_regions``
        only with regions).
    """
    plt = _pyplot()
    view = _View(reference, mask, affine)
    ks = axial_slices(mask, 6)
    out = {"figure_epvs": _figure_overlay(plt, paths["figure_epvs"], view, epvs, ks, ref_sequence),
           "figure_zoom": _figure_zoom(plt, paths["figure_zoom"], view, epvs, ks),
           "figure_mask": _figure_mask(plt, paths["figure_mask"], view)}
    if coregistered:
        out["figure_coreg"] = _figure_coreg(plt, paths["figure_coreg"], view, coregistered, ks, ref_sequence)
    if regions is not None and regions.any():
        out["figure_regions"] = _regions_figure(plt, paths["figure_regions"], reference, regions, mask, view.zooms,
                                                view.window, view.box, region_names or {})
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


class _View:
    """The reference image with its brain mask: voxel sizes (mm), intensity window and brain bounding box."""

    def __init__(self, reference: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> None:
        self.reference, self.mask = reference, mask
        self.zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
        self.aspect = self.zooms[1] / self.zooms[0]
        self.window = _window(reference, mask)
        self.box = _bbox(mask)


def _figure_overlay(plt, path: Path, view: _View, epvs: np.ndarray, ks: list[int], ref_sequence: str) -> Path:
    """ePVS overlay mosaic: six axial slices, ePVS in red, brain-mask outline in yellow."""
    from matplotlib.colors import ListedColormap

    red = ListedColormap([(0, 0, 0, 0), (1.0, 0.15, 0.1, 1.0)])
    (si, sj), (vmin, vmax) = view.box, view.window
    fig, axes = plt.subplots(2, 3, figsize=(13, 9.5), dpi=90, facecolor="black")
    for ax, k in zip(axes.ravel(), ks):
        ax.imshow(view.reference[si, sj, k].T, cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
                  aspect=view.aspect, interpolation="nearest")
        ax.imshow(epvs[si, sj, k].T.astype(np.uint8), cmap=red, vmin=0, vmax=1, origin="lower",
                  aspect=view.aspect, interpolation="nearest")
        ax.contour(view.mask[si, sj, k].T, levels=[0.5], colors=["#f5d142"], linewidths=0.6)
        ax.set_title(f"slice k={k}: {int(epvs[:, :, k].sum())} ePVS voxels", color="white", fontsize=10)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle(f"{ref_sequence}: detected ePVS (red), brain mask (yellow); image right = subject left",
                 color="white", fontsize=11)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _figure_zoom(plt, path: Path, view: _View, epvs: np.ndarray, ks: list[int]) -> Path:
    """Zoom on the central (basal ganglia) region of the lower slice with most central ePVS."""
    mask, (si, sj), (vmin, vmax) = view.mask, view.box, view.window
    ci, cj = [(s.start or 0) + ((s.stop or n) - (s.start or 0)) // 2 for s, n in zip((si, sj), mask.shape[:2])]
    half = [max(8, round(float(35 / z))) for z in view.zooms[:2]]  # +-35 mm around the centre
    zi = slice(max(ci - half[0], 0), ci + half[0])
    zj = slice(max(cj - half[1], 0), cj + half[1])
    lower = [k for k in ks[: max(2, len(ks) // 2)]]
    k_zoom = max(lower, key=lambda k: int(epvs[zi, zj, k].sum())) if lower else ks[0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.2), dpi=90, facecolor="black")
    for ax, overlay in zip(axes, (False, True)):
        ax.imshow(view.reference[zi, zj, k_zoom].T, cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
                  aspect=view.aspect, interpolation="nearest")
        if overlay:
            ax.contour(epvs[zi, zj, k_zoom].T.astype(float), levels=[0.5], colors=["#ff3b2f"], linewidths=1.0)
        ax.set_axis_off()
        ax.set_title(f"central region, slice k={k_zoom}{': ePVS outlined' if overlay else ''}",
                     color="white", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _figure_mask(plt, path: Path, view: _View) -> Path:
    """The brain mask in three orthogonal planes through its centre."""
    reference, mask, zooms, (vmin, vmax) = view.reference, view.mask, view.zooms, view.window
    centre = np.round(np.argwhere(mask).mean(axis=0)).astype(int) if mask.any() else np.array(mask.shape) // 2
    views = [
        (reference[:, :, centre[2]].T, mask[:, :, centre[2]].T, zooms[1] / zooms[0], "axial"),
        (reference[:, centre[1], :].T, mask[:, centre[1], :].T, zooms[2] / zooms[0], "coronal"),
        (reference[centre[0], :, :].T, mask[centre[0], :, :].T, zooms[2] / zooms[1], "sagittal"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3), dpi=80, facecolor="black")
    for ax, (img, msk, asp, title) in zip(axes, views):
        ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", aspect=asp)
        ax.contour(msk, levels=[0.5], colors=["#f5d142"], linewidths=0.8)
        ax.set_axis_off()
        ax.set_title(title, color="white", fontsize=9)
    _save(fig, path)
    plt.close(fig)
    return path


def _figure_coreg(plt, path: Path, view: _View, coregistered: Mapping[str, np.ndarray], ks: list[int],
                  ref_sequence: str) -> Path:
    """Co-registration check: each other sequence with the reference brain-mask outline."""
    (si, sj), mask = view.box, view.mask
    k = ks[len(ks) // 2]
    sequences = list(coregistered)
    fig, axes = plt.subplots(1, len(sequences) + 1, figsize=(4.3 * (len(sequences) + 1), 4.6), dpi=80, facecolor="black")
    axes = np.atleast_1d(axes)
    panels = [(ref_sequence + " (reference)", view.reference)] + [(r + " registered", coregistered[r]) for r in sequences]
    for ax, (title, img) in zip(axes, panels):
        lo, hi = _window(img, mask)
        ax.imshow(img[si, sj, k].T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=view.aspect)
        ax.contour(mask[si, sj, k].T, levels=[0.5], colors=["#3fd0ff"], linewidths=0.8)
        ax.set_axis_off()
        ax.set_title(title, color="white", fontsize=9)
    _save(fig, path)
    plt.close(fig)
    return path


def _regions_figure(plt, path: Path, reference, regions, mask, zooms, window, box, names) -> Path:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n = int(max(regions.max(), max(names, default=0)))
    other = [k for k, v in names.items() if v == "other"]
    base = plt.get_cmap("tab20", 20)
    colours = [(0, 0, 0, 0)] + [base((k - 1) % 20) for k in range(1, n + 1)]
    for k in other:  # 'other' stays transparent: cortex, cerebellum, CSF
        colours[k] = (0, 0, 0, 0)
    cmap = ListedColormap(colours)
    si, sj = box
    ks = axial_slices(mask, 3, lo=0.35, hi=0.72)
    centre_j = int(np.round(np.argwhere(regions > 0)[:, 1].mean())) if regions.any() else regions.shape[1] // 2
    fig, axes = plt.subplots(1, 4, figsize=(17, 5.2), dpi=80, facecolor="black")
    panels = [(reference[si, sj, k].T, regions[si, sj, k].T, zooms[1] / zooms[0], f"axial k={k}") for k in ks]
    panels.append((reference[si, centre_j, :].T, regions[si, centre_j, :].T, zooms[2] / zooms[0],
                   f"coronal j={centre_j}"))
    for ax, (img, lab, asp, title) in zip(axes, panels):
        ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", aspect=asp)
        ax.imshow(lab, cmap=cmap, vmin=0, vmax=n, origin="lower", aspect=asp, alpha=0.45, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(title, color="white", fontsize=9)
    present = sorted(int(k) for k in np.unique(regions) if k > 0 and k not in other)
    handles = [Patch(color=colours[k], label=names.get(k, str(k))) for k in present]
    fig.legend(handles=handles, loc="lower center", ncol=min(7, max(1, len(handles))), fontsize=7,
               frameon=False, labelcolor="white")
    fig.subplots_adjust(bottom=0.16, top=0.93, wspace=0.02)
    _save(fig, path)
    plt.close(fig)
    return path


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def write_report(
    path: Path,
    *,
    summary: Mapping[str, Any],
    plan: Mapping[str, Any],
    figures: Mapping[str, Path],
    table,
    outputs: Sequence[str],
    regions=None,
    review: Mapping[str, Any] | None = None,
) -> Path:
    """Assemble the participant HTML report from the reportlets on disk.

    Parameters
    ----------
    path : Path
        ``<out>/sub-<label>[_ses-<label>].html``.
    summary : mapping
        Counts, volumes, QC measures, warnings, timings (the provenance record,
        ``bids_app.outputs.summary``).
    plan : mapping
        ``SessionPlan.to_dict()``: images used, ignored files, reasons.
    figures : mapping
        Figure key of the outputs' contract (``figure_epvs``...) -> PNG path; title and caption
        come from ``io_spec.json``.
    table : pandas.DataFrame
        Per-cluster table (the largest clusters are listed).
    outputs : sequence of str
        Output files, relative to the output directory.
    regions : pandas.DataFrame, optional
        Per-region table (``epvsprep.anatomy.region_table``).
    review : mapping, optional
        :func:`review_meta`: with it the report holds the interactive viewer and the cluster review
        (loading ``review["library"]`` and ``review["data"]``, relative to the report); without it,
        the cluster table only.
    """
    import jinja2

    from .. import io_spec

    template_text = resources.files("bids_app.data").joinpath("report.html.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=jinja2.select_autoescape(default=True), undefined=jinja2.StrictUndefined)
    template = env.from_string(template_text)
    images = [{"title": io_spec.entry(key)["title"], "caption": io_spec.entry(key)["description"],
               "src": _data_uri(figures[key]), "file": Path(figures[key]).name}
              for key in io_spec.keys() if key in figures]
    region_columns = ["name", "n_clusters", "volume_mm3", "volume_ppm_icv", "region_volume_mm3",
                      "volume_fraction", "mean_cluster_volume_mm3"]
    region_rows = [] if regions is None else [
        [_fmt(r[c]) for c in region_columns] for _, r in regions.iterrows()]
    text = template.render(
        summary=summary, plan=plan, images=images, n_rows=len(table), **_review_context(table, review),
        region_columns=region_columns, region_rows=region_rows, qc=_qc_rows(summary.get("qc", {})),
        validation=validation_rows(summary.get("validation")),
        outputs=list(outputs), created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    return write_text(Path(path), text)


def _review_context(table, review: Mapping[str, Any] | None) -> dict[str, Any]:
    """Template values of the review section: table headings and rows, regions, meta JSON, inlined JS/CSS."""
    import markupsafe

    viewer = resources.files("bids_app.data").joinpath("viewer")
    sort_keys = {"index": "cluster", "volume_mm3": "volume", "mean_score": "score"}
    headings = [{"key": sort_keys.get(c, c), "title": title,
                 "type": "text" if c in ("region", "hemisphere") else "number"}
                for c, title in REVIEW_COLUMNS.items() if c in table.columns]
    headings.append({"key": "elongation", "title": "elongation", "type": "number"})
    rows = review_rows(table)
    meta = "" if review is None else json.dumps(review, sort_keys=True).replace("</", "<\\/")
    return {"review": review, "review_rows": rows, "review_headings": headings,
            "review_regions": sorted({r["data"]["region"] for r in rows}),
            "review_json": markupsafe.Markup(meta),
            "review_js": markupsafe.Markup(viewer.joinpath("review.js").read_text(encoding="utf-8")),
            "review_css": markupsafe.Markup(viewer.joinpath("review.css").read_text(encoding="utf-8"))}


#: Outputs the report does not list as output files (itself and the figures it shows).
_NOT_LISTED = ("report",)


def rebuild_report(output_dir: Path, unit) -> Path:
    """Write a unit's HTML report from its derivatives on disk (tables, provenance, figures, images).

    Nothing is recomputed: the summary and plan come from ``logs/<label>_provenance.json``, the
    tables from the TSVs, the figures from the PNGs (:func:`bids_app.outputs.read_unit`), the
    viewer's images from the written NIfTI files (:func:`write_viewer_data`; left untouched when
    unchanged), and the viewer library is written once per output folder (:func:`install_viewer`).

    Parameters
    ----------
    output_dir : Path
        Root of the derivatives dataset.
    unit : bids_app.io_spec.UnitId
        Which unit.

    Returns
    -------
    Path
        The report, ``<out>/<label>.html``.

    Raises
    ------
    TableError
        A table, sidecar or the provenance record is missing or unreadable (the message names it).
    """
    from ..outputs import read_unit

    output_dir = Path(output_dir)
    outs = read_unit(output_dir, unit, with_provenance=True)
    listed = [str(p.relative_to(output_dir)) for k, p in outs.paths.items()
              if k not in _NOT_LISTED and not k.startswith("figure_") and p.is_file()]
    prov = outs.provenance
    return write_report(outs.paths["report"], summary=prov, plan=prov["plan"], figures=outs.figures,
                        table=outs.clusters, outputs=listed, regions=outs.regions,
                        review=_prepare_review(output_dir, outs))


def _prepare_review(output_dir: Path, outs) -> dict[str, Any]:
    """Write the viewer library (once per folder) and the unit's viewer data; return :func:`review_meta`.

    When the images cannot be read the report is still written, without images in its viewer
    (``viewer_problem`` says why).
    """
    from ..io_spec import TableError

    install_viewer(output_dir)
    try:
        data, problem = write_viewer_data(output_dir, outs.unit, outs.paths), None
    except TableError as exc:
        LOGGER.warning("%s: report viewer without images: %s", outs.unit.label, exc)
        data, problem = None, str(exc)
    return {**review_meta(output_dir, outs, outs.provenance, data), "viewer_problem": problem}


def rebuild_reports(config) -> int:
    """``--reports-only``: rebuild the report of every selected unit from its derivatives on disk.

    Units are those with a provenance record and a cluster table under ``config.output_dir``,
    restricted to ``config.participant_label`` and ``config.session_label``. Nothing else is
    written; masks, maps and tables are not touched.

    Returns
    -------
    int
        0 when every report was rebuilt, 65 when one could not be (its error is logged, the
        others are still rebuilt).

    Raises
    ------
    MissingInputError
        No selected unit has participant-level outputs (exit 66).
    """
    from .. import io_spec
    from ..errors import EXIT_OK, InputError, MissingInputError
    from ..outputs import read_json, unit_id

    output_dir = Path(config.output_dir)
    subjects, sessions = config.participant_label, config.session_label
    units = [u for u in io_spec.find_units(output_dir)
             if (not subjects or u.subject in subjects) and (not sessions or u.session in sessions)]
    labels = {u.label: u for u in units}
    if not labels:
        raise MissingInputError("no participant outputs to rebuild reports from (no "
                                "sub-*/[ses-*/]anat/*_seg-PVSclusters_desc-*_dseg.tsv for the selection): "
                                "run the participant level first", output_dir)
    code = EXIT_OK
    for label, unit in sorted(labels.items()):
        try:  # the provenance's plan names the unit the report belongs to
            plan = read_json(io_spec.unit_paths(output_dir, unit)["provenance"], ("plan",))["plan"]
            path = rebuild_report(output_dir, unit_id(plan))
        except io_spec.TableError as exc:
            LOGGER.error("%s: report not rebuilt: %s", label, exc)
            code = InputError.exit_code
            continue
        LOGGER.info("%s: report rebuilt from the derivatives on disk: %s", label, path)
    return code


# ------------------------------------------------------------------ interactive viewer and cluster review
#: Reasons a rater gives for rejecting a cluster, in the order of the keys 1-6 (Edits JSON, docs/review.md).
REJECT_REASONS = ("vessel", "lacune", "WMH", "artefact", "CSF", "other")

#: Output key -> name of the volume in the viewer data (regions only when the unit has them).
VIEWER_VOLUMES = {"preproc": "reference", "brain_mask": "brain", "epvs_probseg": "probability",
                  "clusters_dseg": "clusters", "regions_dseg": "regions"}

#: Columns of the review table: cluster-table column -> heading (those present are shown).
REVIEW_COLUMNS = {"index": "cluster", "n_voxels": "voxels", "volume_mm3": "volume (mm³)", "region": "region",
                  "hemisphere": "hemisphere", "mean_score": "mean score", "max_score": "max score",
                  "length_mm": "length (mm)", "width_mm": "width (mm)"}


#: Folder of the output dataset, relative to its root, that holds the viewer library shared by the reports.
VIEWER_FOLDER = "figures"


def viewer_library() -> dict[str, str]:
    """The vendored viewer library: ``bids_app/data/viewer/VENDOR.json`` (name, version, file, sha256)."""
    text = resources.files("bids_app.data").joinpath("viewer", "VENDOR.json").read_text(encoding="utf-8")
    return json.loads(text)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_if_changed(path: Path, data: bytes) -> Path:
    """Write ``data`` atomically unless ``path`` already holds exactly these bytes (then it is not touched)."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return path
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def install_viewer(output_dir: Path) -> Path:
    """Write the viewer library once per output folder: ``<out>/figures/niivue-<version>.umd.js``.

    Every report of the folder loads this one file with a classic ``<script src>``; it is left
    untouched when it already holds the vendored bytes. Its licence is written beside it. The
    folder is one the derivatives' ``.bidsignore`` already lists (``**/figures``), like the reports.

    Returns
    -------
    Path
        The library file.

    Raises
    ------
    RuntimeError
        The packaged library does not match the sha256 recorded in ``VENDOR.json`` (a damaged install).
    """
    lib = viewer_library()
    source = resources.files("bids_app.data").joinpath("viewer")
    data = source.joinpath(lib["file"]).read_bytes()
    if _sha256(data) != lib["sha256"]:
        raise RuntimeError(f"bids_app/data/viewer/{lib['file']}: sha256 differs from VENDOR.json; reinstall "
                           "epvs-bids or run scripts/vendor_niivue.sh")
    folder = Path(output_dir) / VIEWER_FOLDER
    _write_if_changed(folder / "LICENSE_NiiVue.txt", source.joinpath("LICENSE_NiiVue.txt").read_bytes())
    return _write_if_changed(folder / lib["file"], data)


def viewer_data_path(output_dir: Path, unit) -> Path:
    """``<out>/sub-<s>/figures/<stem>_desc-<combination>_viewer.js``: the unit's images for the viewer."""
    from .. import io_spec

    return io_spec.path_of(output_dir, unit, "figure_epvs").parent / f"{unit.key}_viewer.js"


def crop_box(keep: np.ndarray, pad: int = 4) -> tuple[slice, slice, slice]:
    """Bounding box of ``keep`` (bool, shape (I, J, K)) grown by ``pad`` voxels, within the image."""
    if not keep.any():
        return tuple(slice(0, n) for n in keep.shape)
    idx = np.argwhere(keep)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, keep.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _label_dtype(labels: np.ndarray):
    top = int(labels.max(initial=0))
    return np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32


def _grid_images(paths: Mapping[str, Path]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The images of :data:`VIEWER_VOLUMES` (viewer name -> array) and the affine of their common grid.

    Raises
    ------
    TableError
        An image is missing, unreadable, or not on the grid of ``preproc`` (the message names it).
    """
    import nibabel as nib

    from ..io_spec import TableError

    arrays, grid = {}, None
    for key, name in VIEWER_VOLUMES.items():
        if key == "regions_dseg" and not Path(paths[key]).is_file():
            continue
        try:
            img = nib.load(paths[key])
            data = np.asanyarray(img.dataobj)
        except (OSError, ValueError, EOFError) as exc:
            raise TableError(f"{paths[key]}: cannot be read for the report viewer ({exc})") from exc
        data = data[..., 0] if data.ndim == 4 else data
        if grid is None:
            grid = (data.shape, img.affine)
        elif data.shape != grid[0] or not np.allclose(img.affine, grid[1], atol=1e-3):
            raise TableError(f"{paths[key]}: not on the grid of {paths['preproc']} (shape {data.shape})")
        arrays[name] = data
    return arrays, np.asarray(grid[1], dtype=float)


def viewer_volumes(paths: Mapping[str, Path]) -> dict[str, Any]:
    """The unit's images for the viewer, cropped to the brain and stored small.

    Parameters
    ----------
    paths : mapping
        Output key -> path (:func:`bids_app.io_spec.unit_paths`); reads ``preproc``, ``brain_mask``,
        ``epvs_probseg``, ``clusters_dseg`` and, when present, ``regions_dseg`` (all on the reference grid).

    Returns
    -------
    dict
        ``volumes`` (name -> ndarray, shape of the crop: ``reference`` uint8 after windowing the
        1st-99.5th percentile inside the brain, ``probability`` uint8 = round(255 x score),
        ``brain`` uint8, ``clusters`` and ``regions`` uint8/uint16 labels), ``affine`` (4, 4) of the
        crop, ``full_affine`` and ``shape`` of the written images, ``offset`` (voxel index of the
        crop's first voxel, i j k) and ``window`` (reference intensities mapped to 0 and 255).

    Raises
    ------
    TableError
        An image is missing, unreadable, or not on the reference's grid (the message names it).
    """
    arrays, affine = _grid_images(paths)
    brain, clusters = arrays["brain"] > 0, arrays["clusters"]
    box = crop_box(brain | (clusters > 0))
    lo, hi = _window(np.asarray(arrays["reference"], dtype=np.float32), brain)
    ref = np.asarray(arrays["reference"][box], dtype=np.float32)
    score = np.clip(np.nan_to_num(arrays["probability"][box]), 0, 1)
    volumes = {"reference": np.rint(np.clip((ref - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8),
               "probability": np.rint(score * 255).astype(np.uint8),
               "brain": brain[box].astype(np.uint8),
               "clusters": clusters[box].astype(_label_dtype(clusters))}
    if "regions" in arrays:
        volumes["regions"] = arrays["regions"][box].astype(_label_dtype(arrays["regions"]))
    offset = [s.start for s in box]
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
    return {"volumes": volumes, "affine": crop_affine, "full_affine": affine, "shape": list(clusters.shape),
            "offset": offset, "window": [lo, hi]}


def _nifti_base64(data: np.ndarray, affine: np.ndarray) -> str:
    """A NIfTI-1 image, gzip-compressed (no time stamp: the same data give the same bytes), in base64."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return base64.b64encode(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)).decode("ascii")


def write_viewer_data(output_dir: Path, unit, paths: Mapping[str, Path]) -> Path:
    """Write the unit's viewer data file: a classic script setting ``window.EPVS_VIEWER_DATA``.

    A page opened from disk (``file://``) may load classic scripts but not ``fetch()`` files or ES
    modules, so the volumes travel as base64 ``.nii.gz`` strings inside a script (:func:`viewer_volumes`).
    The bytes depend only on the images: a rebuild from unchanged outputs leaves the file untouched.

    Returns
    -------
    Path
        :func:`viewer_data_path`.
    """
    found = viewer_volumes(paths)
    record = {"format_version": 1, "key": unit.key, "label": unit.label, "shape": found["shape"],
              "offset": found["offset"], "affine": found["full_affine"].tolist(),
              "inverse_affine": np.linalg.inv(found["full_affine"]).tolist(),
              "window": [round(float(v), 4) for v in found["window"]],
              "volumes": {name: _nifti_base64(arr, found["affine"]) for name, arr in found["volumes"].items()},
              "dtypes": {name: str(arr.dtype) for name, arr in found["volumes"].items()}}
    text = (f"/* epvs-bids viewer data for {unit.key}: images cropped to the brain, uint8/uint16 NIfTI, gzip, "
            f"base64 (docs/review.md) */\nwindow.EPVS_VIEWER_DATA = {json.dumps(record, separators=(',', ':'))};\n")
    return _write_if_changed(viewer_data_path(output_dir, unit), text.encode("ascii"))


def review_meta(output_dir: Path, outs, provenance: Mapping[str, Any], data_file: Path | None) -> dict[str, Any]:
    """What the report's review needs besides the table: the Edits JSON header and where the data are.

    Paths are relative to the output folder (where the report lies); ``storage_key`` names the
    browser storage of the decisions and changes when the cluster table changes.
    """
    output_dir = Path(output_dir)
    unit, paths = outs.unit, outs.paths
    model = outs.model
    rel = lambda p: Path(p).relative_to(output_dir).as_posix()  # noqa: E731
    table_sha = _sha256(Path(paths["clusters_tsv"]).read_bytes())[:16]
    return {
        "software": {"name": "epvs-bids", "version": provenance.get("version")},
        "model": {"id": model["model_id"] or provenance.get("model_id"), "weights_sha256": model["weights_sha256"]},
        "unit": {"label": unit.label, "subject": unit.subject, "session": unit.session, "combination": unit.desc},
        "mask": rel(paths["epvs_mask"]), "clusters": rel(paths["clusters_dseg"]),
        "n_clusters": int(len(outs.clusters)), "reasons": list(REJECT_REASONS), "key": unit.key,
        "storage_key": f"epvs-bids-review:{rel(paths['clusters_dseg'])}:{table_sha}",
        "data": None if data_file is None else rel(data_file),
        "library": f"{VIEWER_FOLDER}/{viewer_library()['file']}",
    }


def review_rows(table) -> list[dict[str, Any]]:
    """One row per cluster for the review table: shown cells and the values the page sorts, filters and jumps by.

    ``x``, ``y``, ``z`` are the centroid in scanner mm (RAS+); ``elongation`` = length / width.
    """
    from ..outputs import finite

    rows = []
    for _, r in table.sort_values("index").iterrows():
        length, width = finite(r.get("length_mm")), finite(r.get("width_mm"))
        values = {"cluster": int(r["index"]), "x": finite(r.get("centroid_x")), "y": finite(r.get("centroid_y")),
                  "z": finite(r.get("centroid_z")), "volume": finite(r["volume_mm3"]),
                  "score": finite(r.get("mean_score")), "elongation": length / width if width > 0 else float("nan"),
                  "region": str(r["region"]) if "region" in r and r["region"] == r["region"] else "n/a"}
        cells = [_fmt(r[c]) if c in r else "n/a" for c in REVIEW_COLUMNS if c in table.columns]
        cells.append(_fmt(values["elongation"]))
        rows.append({"cells": cells, "data": {k: ("" if isinstance(v, float) and not np.isfinite(v) else
                                                  (f"{v:.6g}" if isinstance(v, float) else str(v)))
                                              for k, v in values.items()}})
    return rows


def validation_rows(record) -> list[tuple[str, str]]:
    """The BIDS validation of the run as label/value pairs for the report (``validation`` of the provenance).

    A mapping gives validator, scope, result and counts; a sentence (``Intake.validation``) is shown
    as the result; nothing recorded gives one row that says so.
    """
    if isinstance(record, Mapping):
        names = (("validator", "Validator"), ("version", "Validator version"), ("scope", "Scope"),
                 ("result", "Result"), ("n_errors", "Errors"), ("n_warnings", "Warnings"),
                 ("warning_codes", "Warning codes"))
        return [(label, ", ".join(map(str, record[k])) if isinstance(record[k], (list, tuple)) else str(record[k]))
                for k, label in names if record.get(k) is not None]
    if isinstance(record, str) and record:
        return [("Result", record)]
    return [("Result", "not recorded in this run's provenance (logs/<label>_provenance.json has no 'validation')")]


#: How each QC measure is shown: label, unit, and its normal range text.
_QC_LABELS = {
    "snr": ("SNR (within white matter)", ""),
    "cnr": ("CNR (grey/white matter)", ""),
    "brain_volume_mm3": ("Brain-mask volume", "cm³"),
    "icv_mm3": ("Intracranial volume", "cm³"),
    "background_share": ("Brain mask at ~0 intensity (empty background)", "%"),
}


def _qc_rows(qc: Mapping[str, Any]) -> dict[str, Any]:
    """QC object -> rows for the report: measures with range and flag, and registrations."""
    from epvsprep.qc import ranges_for

    flags = list(qc.get("flags", []))
    if qc.get("brain_mask_ok") is False:  # a failed mask stopped the region outputs: say so first
        flags.insert(0, "BRAIN MASK FAILED: no region outputs and no ICV were written; check the brain mask figure")
    ranges = ranges_for(qc.get("age_years"))  # volume ranges for the participant's age (unknown: wide)
    measures = []
    for key, (label, unit) in _QC_LABELS.items():
        if key not in qc:
            continue
        value = qc[key]
        lo, hi = ranges.get(key, (None, None))
        scale = {"cm³": 1e-3, "%": 100.0}.get(unit, 1.0)
        shown = "n/a" if value is None or not np.isfinite(float(value)) else f"{float(value) * scale:.4g} {unit}"
        rng = (f"{'' if lo is None else f'{lo * scale:g}'} - {'' if hi is None else f'{hi * scale:g}'} {unit}"
               if (lo is not None or hi is not None) else "")
        out_of_range = value is None or not np.isfinite(float(value)) or (lo is not None and value < lo) or (
            hi is not None and value > hi)
        measures.append({"label": label, "value": shown, "range": rng.strip(), "ok": not out_of_range})
    registrations = []
    for sequence, reg in (qc.get("registration") or {}).items():
        registrations.append({
            "sequence": sequence, "to": reg.get("to", "subject" if sequence == "template" else ""),
            "metric": reg.get("metric", ""), "before": _fmt(reg.get("before")), "after": _fmt(reg.get("after")),
            "ok": bool(reg.get("ok")), "extra": (f"template brain vs brain mask Dice {reg['brain_mask_dice']:.2f}"
                                                 if "brain_mask_dice" in reg else ""),
        })
    return {"measures": measures, "registrations": registrations, "flags": flags}


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return "n/a"
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return html.escape(str(value))

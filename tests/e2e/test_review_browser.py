"""The participant report's viewer and cluster review in a real browser (Debian's chromium, headless).

The report of a small synthetic unit (``tests/bids_app/test_report_viewer.py``: four clusters at known
voxels on a 2 mm LAS grid) is opened from disk (``file://``) with Playwright driving
``/usr/bin/chromium``: no console error, no request other than ``file://``, a click on a table row
centres the viewer on that cluster, keys mark clusters, a click in add mode adds a missed ePVS, the
decisions survive a reload, and the exported Edits JSON matches the contract (docs/review.md).
Skipped when chromium or Playwright is missing.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from bids_app.reports import participant as report

_HERE = Path(__file__).resolve().parents[1] / "bids_app" / "test_report_viewer.py"
_spec = importlib.util.spec_from_file_location("report_viewer_unit", _HERE)
viewer_unit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(viewer_unit)

EDITS_KEYS = {"format", "format_version", "rater", "date", "software", "model", "unit", "mask", "clusters",
              "n_clusters", "n_reviewed", "decisions", "added"}


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[test]')")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def unit(tmp_path_factory):
    out = tmp_path_factory.mktemp("review") / "out"
    written = viewer_unit.write_synthetic_unit(out)
    written["report"] = report.rebuild_report(out, viewer_unit.UNIT)
    return written


def _open(context, url: str):
    page = context.new_page()
    problems, requests = [], []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    started = time.monotonic()
    page.goto(url, timeout=120_000)
    page.wait_for_function("document.body.dataset.viewer === 'ready'", timeout=90_000)
    return page, problems, requests, time.monotonic() - started


def _crosshair_mm(page) -> np.ndarray:
    """The crosshair in scanner mm (NiiVue's frac2mm with isForceSliceMM: through the image's affine)."""
    return np.array(page.evaluate(
        "Array.from(window.epvsViewer.frac2mm(window.epvsViewer.scene.crosshairPos, 0, true)).slice(0, 3)"))


def _centroid(unit, cluster: int) -> np.ndarray:
    row = unit["table"].set_index("index").loc[cluster]
    return row[["centroid_x", "centroid_y", "centroid_z"]].to_numpy(float)


def _row(page, cluster: int):
    return page.locator(f'#review-table tbody tr[data-cluster="{cluster}"]')


def test_review_in_chromium(browser, unit, tmp_path):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1000})
    page, problems, requests, load_s = _open(context, unit["report"].as_uri())
    print(f"viewer ready {load_s:.1f} s after navigation")

    # a click on a row centres the viewer on that cluster (centroid in scanner mm; the grid is oblique)
    for cluster in (3, 1):
        _row(page, cluster).click()
        assert np.abs(_crosshair_mm(page) - _centroid(unit, cluster)).max() <= 0.05
    assert page.locator("#review-current").inner_text().startswith("cluster 1 ")

    # keys: accept 1 (moves on to 2), unsure 2 (-> 3), reject 3 as a vessel with key 1 (-> 5), then p back to 3
    for key in ("a", "u", "1"):
        page.keyboard.press(key)
    assert page.locator("#review-current").inner_text().startswith("cluster 5 ")
    assert np.abs(_crosshair_mm(page) - _centroid(unit, 5)).max() <= 0.05
    page.keyboard.press("p")
    assert page.locator("#review-current").inner_text().startswith("cluster 3 ")
    assert _row(page, 3).locator(".decision").inner_text() == "reject: vessel"
    assert page.locator("#review-progress").inner_text() == "3 of 4 reviewed"

    # the filters and the sort act on the table
    page.select_option("#filter-region", "basal_ganglia_right")
    assert page.locator("#review-shown").inner_text() == "2 shown"
    page.select_option("#filter-region", "")
    page.check("#filter-todo")
    assert page.locator("#review-shown").inner_text() == "1 shown"
    page.uncheck("#filter-todo")
    page.locator('#review-table th[data-sort="volume"] button').click()
    order = page.eval_on_selector_all("#review-table tbody tr", "rows => rows.map(r => Number(r.dataset.cluster))")
    volumes = unit["table"].set_index("index")["volume_mm3"]
    assert order == sorted(volumes.index, key=lambda c: volumes[c])

    # add mode: a click on the image adds the voxel under the crosshair
    page.keyboard.press("m")
    assert "ADD MODE" in page.locator("#review-mode").inner_text()
    box = page.locator("#viewer-canvas").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.22, box["y"] + box["height"] * 0.28)
    page.wait_for_function("window.epvsReview.state.added.length === 1", timeout=10_000)
    page.keyboard.press("Escape")
    added = page.evaluate("window.epvsReview.state.added[0]")
    crosshair = _crosshair_mm(page)
    affine = unit["affine"]
    voxel = np.rint(np.linalg.inv(affine) @ [*crosshair, 1])[:3].astype(int)
    assert added["voxel"] == voxel.tolist()
    assert np.allclose(added["mm"], (affine @ [*voxel, 1])[:3], atol=1e-3)
    assert all(0 <= v < n for v, n in zip(added["voxel"], viewer_unit.SHAPE))
    assert page.evaluate("window.epvsViewer.drawBitmap.reduce((n, v) => n + (v > 0), 0)") == 1  # drawn in green

    # decisions and the added point survive a reload (browser storage)
    page.reload(timeout=120_000)  # the table and the progress are painted before the viewer starts: no need to wait for it
    assert page.locator("#review-progress").inner_text() == "3 of 4 reviewed"
    assert _row(page, 1).locator(".decision").inner_text() == "accept"

    # export: refused without a rater, then the Edits JSON of the contract
    page.locator("#review-export").click()
    assert "Rater" in page.locator("#review-message").inner_text()
    page.fill("#review-rater", "J. D.")
    with page.expect_download() as info:
        page.locator("#review-export").click()
    download = info.value
    assert download.suggested_filename == "sub-01_ses-1_desc-T2wT1w_rater-JD_edits.json"
    edits = json.loads(Path(download.path()).read_text())
    assert set(edits) == EDITS_KEYS
    assert edits["format"] == "epvs-bids-edits" and edits["format_version"] == 1 and edits["rater"] == "J. D."
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", edits["date"])
    assert edits["software"] == {"name": "epvs-bids", "version": "9.9.9-test"}
    assert edits["model"] == {"id": "epvs-unet25d-v3", "weights_sha256": "ab" * 32}
    assert edits["unit"] == {"label": "sub-01_ses-1", "subject": "01", "session": "1", "combination": "T2wT1w"}
    out = unit["paths"]["epvs_mask"].parents[3]
    assert (out / edits["mask"]) == unit["paths"]["epvs_mask"]
    assert (out / edits["clusters"]) == unit["paths"]["clusters_dseg"]
    assert edits["n_clusters"] == 4 and edits["n_reviewed"] == 3
    assert edits["decisions"] == [{"cluster": 1, "decision": "accept"}, {"cluster": 2, "decision": "unsure"},
                                  {"cluster": 3, "decision": "reject", "reason": "vessel"}]
    assert edits["added"] == [added]
    _apply_gives_the_reviewed_mask(unit, download.path(), added)

    assert not problems, problems
    assert [u for u in requests if not u.startswith(("file://", "blob:", "data:"))] == []
    assert any(u.endswith(report.viewer_library()["file"]) for u in requests)
    context.close()


def _apply_gives_the_reviewed_mask(unit, edits_path, added) -> None:
    """The downloaded review, applied by ``epvs-bids-edits apply``: cluster 3 (rejected) loses exactly its
    voxels, the accepted and unsure clusters stay, and the added point becomes a cluster."""
    import nibabel as nib

    from bids_app import edits

    paths = unit["paths"]
    out = paths["epvs_mask"].parents[3]  # <out>/sub-01/ses-1/anat/<mask>
    assert edits.main(["apply", str(out), str(edits_path)]) == 0
    automatic = np.asanyarray(nib.load(paths["epvs_mask"]).dataobj) > 0
    clusters = np.asanyarray(nib.load(paths["clusters_dseg"]).dataobj)
    reviewed_path = paths["epvs_mask"].with_name(paths["epvs_mask"].name.replace("desc-T2wT1w", "desc-reviewedJD"))
    reviewed = np.asanyarray(nib.load(reviewed_path).dataobj) > 0
    assert not (reviewed & (clusters == 3)).any()
    assert (reviewed[automatic & (clusters != 3)]).all()
    new = reviewed & ~automatic
    assert new[tuple(added["voxel"])] and new.sum() >= 1


def test_report_without_its_data_file_says_what_to_copy(browser, unit, tmp_path):
    alone = tmp_path / unit["report"].name
    shutil.copy(unit["report"], alone)  # the report copied without the output folder
    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(alone.as_uri(), timeout=120_000)
    page.wait_for_function("document.getElementById('viewer-status').textContent.includes('not found')")
    assert "figures/niivue-" in page.locator("#viewer-status").inner_text()
    _row(page, 2).click()  # the table still works
    page.keyboard.press("a")
    assert page.locator("#review-progress").inner_text() == "1 of 4 reviewed"
    assert not errors, errors
    context.close()


def _descendants_cpu_s() -> float:
    """CPU time (user + system, s) of every live process below this one (the browser's), from /proc (Linux)."""
    import os

    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    mine, grew = {os.getpid()}, True
    while grew:
        new = {pid for pid, (ppid, _) in parents.items() if ppid in mine and pid not in mine}
        mine |= new
        grew = bool(new)
    return sum(parents[pid][1] for pid in mine if pid != os.getpid() and pid in parents)


def measure(out_dir: Path, repeats: int = 3) -> list[dict]:
    """Size of each report and of its viewer data, and the time chromium takes to show its viewer.

    ``load_s``: from navigation to the viewer being ready (images decoded, NiiVue drawing), median of
    ``repeats`` loads in a fresh browser context each; ``cpu_s``: the CPU time the browser's processes
    spent meanwhile (what a busy machine stretches into a longer ``load_s``). Headless chromium renders
    WebGL2 in software (SwiftShader), so a desktop browser with a GPU is faster.
    """
    import os
    import statistics

    from playwright.sync_api import sync_playwright

    from bids_app import io_spec
    from bids_app.outputs import read_json, unit_id

    out_dir = Path(out_dir)
    library = out_dir / report.VIEWER_FOLDER / report.viewer_library()["file"]
    rows = []
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        for found in io_spec.find_units(out_dir):
            plan = read_json(io_spec.unit_paths(out_dir, found)["provenance"], ("plan",))["plan"]
            unit = unit_id(plan)
            html = io_spec.unit_paths(out_dir, unit)["report"]
            data = report.viewer_data_path(out_dir, unit)
            times, cpu = [], []
            for _ in range(repeats):
                context = chromium.new_context()
                before = _descendants_cpu_s()
                page, problems, requests, load_s = _open(context, html.as_uri())
                cpu.append(_descendants_cpu_s() - before)
                assert not problems, problems
                assert not [u for u in requests if not u.startswith(("file://", "blob:", "data:"))]
                times.append(load_s)
                context.close()
            rows.append({"unit": unit.label, "report_MB": html.stat().st_size / 1e6,
                         "viewer_data_MB": data.stat().st_size / 1e6, "library_MB": library.stat().st_size / 1e6,
                         "load_s": round(statistics.median(times), 2), "loads_s": [round(t, 2) for t in times],
                         "cpu_s": round(statistics.median(cpu), 2), "os_load_average": os.getloadavg()[0]})
        chromium.close()
    return rows


if __name__ == "__main__":  # python tests/e2e/test_review_browser.py OUT_DIR: the numbers of docs/review.md
    import sys

    for row in measure(Path(sys.argv[1])):
        print(json.dumps(row))

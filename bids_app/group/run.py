"""The group level: read the participant derivatives, compute cohort statistics, write tables and
the group report. See ``docs/group.md`` for every output."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pandas as pd

from ..config import RunConfig
from ..derivatives import init_output_dir, write_json, write_tsv
from ..errors import EXIT_DATAERR, EXIT_OK, InputError, MissingInputError
from . import agreement, collect, columns, longitudinal, reviewed, stats
from .workers import Workers

LOGGER = logging.getLogger(__name__)

#: Wide-table measures per region (``<name>__<measure>`` columns).
WIDE_MEASURES = ("n_clusters", "volume_mm3", "volume_ppm_icv")


def _write(group: Path, name: str, table: pd.DataFrame, sidecar: dict) -> Path:
    """Write ``group/<name>.tsv`` and its JSON sidecar (only the columns present are described)."""
    write_tsv(group / f"{name}.tsv", table)
    write_json(group / f"{name}.json", {c: sidecar.get(c, {"Description": c}) for c in table.columns})
    return group / f"{name}.tsv"


def _age_lookup(participants: pd.DataFrame | None) -> dict[str, float]:
    if participants is None:
        return {}
    col = next((c for c in participants.columns if c.lower() == "age"), None)
    if col is None:
        return {}
    ages = pd.to_numeric(participants[col], errors="coerce")
    return {pid: float(a) for pid, a in ages.items() if pd.notna(a)}


def collect_tables(output_dir: Path, bids_dir: Path | None = None, workers: Workers | None = None, *,
                   early=None) -> dict:
    """Read every unit and build the cohort tables (the units' tables in ``workers`` when given).

    ``early``: called with every unit found once their reading is submitted, to submit more work
    to ``workers`` (the agreement) while this process builds the tables.

    Returns
    -------
    dict
        ``units`` (list of read :class:`~bids_app.group.collect.Unit`), ``cohort`` (wide),
        ``long``, ``failed``, ``participants`` (or None), ``dates``, ``models`` (one row per model
        and weights), ``models_warning`` (a sentence when the cohort mixes models, else None) and
        ``unreadable`` (count).
    """
    units = collect.find_units(output_dir)
    if not units:
        raise MissingInputError(
            "no participant outputs found (no sub-*/[ses-*/]anat/*_seg-PVSclusters_desc-*_dseg.tsv): "
            "run the participant level first", output_dir)
    participants = None
    if bids_dir is not None:
        try:
            participants = collect.read_participants(bids_dir)
        except collect.TableError as exc:
            LOGGER.warning("%s (ages and covariates unavailable)", exc)
    workers = workers or Workers(1)
    reads = workers.submit(_read_one, units)
    if early is not None:
        early(units)
    ok_units, base, long, failed_rows = _read_units(units, reads())
    dates, session_age = _session_dates(bids_dir, ok_units)
    cohort = _cohort_table(output_dir, base, dates, session_age, _age_lookup(participants))
    outliers = stats.qc_outliers(cohort)
    flagged = outliers.loc[outliers["source"] == "tukey"].groupby("unit")["measure"].agg("; ".join)
    cohort["qc_outlier"] = cohort["unit"].map(flagged)
    cohort = _with_regional_columns(cohort, long)
    failed_rows += failed_units(output_dir, ok_units, bids_dir, skip={r["unit"] for r in failed_rows})
    failed = pd.DataFrame(failed_rows, columns=list(columns.FAILED))
    models = collect.model_table(cohort)
    mixed = collect.mixed_models_warning(models)
    if mixed:
        LOGGER.warning("%s", mixed)
    return {"units": ok_units, "cohort": cohort, "long": long, "failed": failed, "outliers": outliers,
            "participants": participants, "dates": dates, "models": models, "models_warning": mixed,
            "unreadable": int((failed["status"] == "unreadable").sum())}


def _read_one(unit) -> tuple[dict | None, list[dict] | None, str | None]:
    """One unit's summary and long rows, or the reason it is unreadable (a worker)."""
    try:
        collect.read_unit(unit)
    except collect.TableError as exc:
        return None, None, str(exc)
    rows = collect.unit_rows(unit)
    unit.regions = None  # keep memory bounded: the long rows hold what is needed
    return unit.summary, rows, None


def _read_units(units: list, results: list) -> tuple[list, pd.DataFrame, pd.DataFrame, list[dict]]:
    """The units' :func:`_read_one` results: the readable units, their whole-brain rows, the long
    (region) rows, and the failures. Only the summary and the long rows are kept per unit (memory
    grows with units x regions)."""
    base_rows, long_rows, failed_rows, ok_units = [], [], [], []
    for unit, (summary, rows, error) in zip(units, results):
        if error is not None:
            LOGGER.error("%s", error)
            failed_rows.append({"unit": unit.label, "status": "unreadable", "exit_code": EXIT_DATAERR,
                                "message": error})
            continue
        unit.summary = summary
        ok_units.append(unit)
        base_rows.append({"unit": unit.key, "participant_id": unit.participant_id, "session_id": unit.session_id,
                          "source_entities": unit.source_entities, "input_sequences": unit.combination, **summary})
        long_rows += rows
    long = pd.DataFrame(long_rows, columns=["unit", *stats.UNIT_KEY, "name", "region", "hemisphere", *collect.MEASURES])
    base = pd.DataFrame(base_rows, columns=[c for c in columns.COHORT if c not in
                                            ("qc_outlier", "age", "acq_datetime", "report")])
    return ok_units, base, long, failed_rows


def _session_dates(bids_dir: Path | None, ok_units: list) -> tuple[pd.DataFrame, dict]:
    """Acquisition dates and ages of the sessions of participants with several sessions (what dates are for)."""
    dates_rows = []
    multi = {u.participant_id for u in ok_units if u.session_id} if bids_dir is not None else set()
    counts = pd.Series([u.participant_id for u in ok_units if u.session_id]).value_counts()
    multi = {p for p in multi if counts.get(p, 0) >= 2}
    session_tables = {pid: collect.read_sessions(bids_dir, pid) for pid in sorted(multi)}
    session_age = {}
    for unit in ok_units:
        if unit.participant_id not in multi:
            continue
        sessions = session_tables.get(unit.participant_id)
        when, source = collect.acquisition_date(bids_dir, unit, sessions)
        if sessions is not None and unit.session_id in sessions.index:
            col = next((c for c in sessions.columns if c.lower() == "age"), None)
            if col is not None:
                age = pd.to_numeric(pd.Series([sessions.at[unit.session_id, col]]), errors="coerce").iloc[0]
                if pd.notna(age):
                    session_age[(unit.participant_id, unit.session_id)] = float(age)
        dates_rows.append({"participant_id": unit.participant_id, "session_id": unit.session_id,
                           "acq_datetime": when, "date_source": source,
                           "age": session_age.get((unit.participant_id, unit.session_id), math.nan)})
    dates = pd.DataFrame(dates_rows, columns=["participant_id", "session_id", "acq_datetime", "date_source", "age"])
    return dates, session_age


def _cohort_table(output_dir: Path, base: pd.DataFrame, dates: pd.DataFrame, session_age: dict,
                  ages: dict) -> pd.DataFrame:
    """The whole-brain cohort table with age, acquisition time and the link to each participant report."""
    cohort = base.copy()
    cohort["age"] = [session_age.get((p, s), ages.get(p, math.nan))
                     for p, s in zip(cohort["participant_id"], cohort["session_id"])]
    if len(dates):
        when = dates.drop_duplicates(["participant_id", "session_id"]).set_index(["participant_id", "session_id"])
        cohort["acq_datetime"] = [when["acq_datetime"].get((p, s)) for p, s in
                                  zip(cohort["participant_id"], cohort["session_id"])]
        cohort["acq_datetime"] = [None if w is None or pd.isna(w) else w.isoformat() for w in cohort["acq_datetime"]]
    else:
        cohort["acq_datetime"] = None
    reports = []
    for p, s in zip(cohort["participant_id"], cohort["session_id"]):
        rel = f"{p}_{s}.html" if isinstance(s, str) else f"{p}.html"
        reports.append(rel if (Path(output_dir) / rel).exists() else None)
    cohort["report"] = reports
    return cohort


def _with_regional_columns(cohort: pd.DataFrame, long: pd.DataFrame) -> pd.DataFrame:
    """The wide form: the whole-brain columns, then ``<name>__<measure>`` for every region."""
    regional = long.loc[long["name"] != collect.WHOLE_BRAIN]
    if not len(regional):
        return cohort
    order = sorted(regional.drop_duplicates("name").itertuples(index=False),
                   key=lambda r: collect.region_sort_key(r.name, r.region, r.hemisphere))
    wide = regional.pivot_table(index="unit", columns="name", values=list(WIDE_MEASURES),
                                aggfunc="first", dropna=False)
    wide.columns = [f"{name}__{measure}" for measure, name in wide.columns]
    wide = wide[[f"{r.name}__{m}" for r in order for m in WIDE_MEASURES if f"{r.name}__{m}" in wide.columns]]
    return cohort.merge(wide.reset_index(), on="unit", how="left")


def failed_units(output_dir: Path, units: list, bids_dir: Path | None = None, skip=frozenset()) -> list[dict]:
    """Units that failed at the participant level, are incomplete, or were never run.

    ``skip``: unit labels already listed (unreadable derivatives).
    """
    done = {u.label for u in units} | set(skip)
    rows = []
    records = collect.status_records(output_dir)
    for label, status in records.items():
        if status.get("status") == "failed":
            rows.append({"unit": label, "status": "failed", "exit_code": status.get("exit_code"),
                         "message": status.get("message")})
        elif status.get("status") == "complete" and label not in done:
            rows.append({"unit": label, "status": "incomplete", "exit_code": None,
                         "message": "marked complete but no readable cluster table was found; rerun the "
                                    "participant level with --overwrite"})
    if bids_dir is not None and Path(bids_dir).is_dir():
        raw = collect.raw_units(bids_dir)
        with_sessions = {x.split("_ses-")[0] for x in raw if "_ses-" in x}
        for label in raw:
            # a subject with sessions is processed per session: its own label is not a unit
            if label in done or label in records or label in with_sessions:
                continue
            rows.append({"unit": label, "status": "not_run", "exit_code": None,
                         "message": "in the raw dataset but without participant-level outputs or status"})
    return rows


def _track_series(job: tuple) -> tuple[pd.DataFrame | None, pd.DataFrame | None, str | None]:
    """Cluster tracks of one series (a worker: failures come back as a message, never raised)."""
    pid, combination, units, sessions, mode, seed = job
    t0 = time.monotonic()
    try:
        tracks, pairs = longitudinal.track_clusters(units, sessions, mode=mode, seed=seed)
    except Exception as exc:  # noqa: BLE001 - one series must not stop the cohort
        return None, None, f"{pid} ({', '.join(sessions)}): cluster matching failed ({type(exc).__name__}: {exc})"
    LOGGER.info("%s: clusters tracked through %s (%s, %.1f s)", pid, ", ".join(sessions), mode,
                time.monotonic() - t0)
    for table in (tracks, pairs):
        table.insert(0, "input_sequences", combination)
        table.insert(0, "participant_id", pid)
    pairs["tolerance_mm"] = longitudinal.TOLERANCE_MM
    return tracks, pairs, None


def run_longitudinal(tables: dict, *, mode: str, seed: int = 42, nprocs: int = 1,
                     workers: Workers | None = None) -> dict:
    """Reliability, change, slopes and (unless ``mode == "none"``) cluster tracks through every session.

    Series are tracked in ``workers`` (else in ``nprocs`` processes) while this process computes
    the statistics.
    """
    if workers is None:
        with Workers(nprocs) as own:
            return run_longitudinal(tables, mode=mode, seed=seed, workers=own)
    long = tables["long"]
    series = stats.session_series(long, tables["dates"])
    jobs = []
    if mode != "none" and len(series):
        by_key = {u.key: u for u in tables["units"]}
        for (pid, combination), grp in series.groupby(["participant_id", "input_sequences"], sort=True):
            grp = grp.sort_values("order")
            jobs.append((pid, combination, [by_key[k] for k in grp["unit"]], list(grp["session_id"]), mode, seed))
    tracked = workers.submit(_track_series, jobs)
    icc, agree = stats.longitudinal_reliability(long, series)
    change = stats.longitudinal_change(long, series)
    slopes = stats.longitudinal_slopes(long, series)
    pair_rows, track_rows = [], []
    if jobs:
        for tracks, pairs, error in tracked():
            if error is not None:
                LOGGER.warning("%s", error)
                continue
            track_rows.append(tracks)
            pair_rows.append(pairs)
    clusters = pd.concat(pair_rows, ignore_index=True) if pair_rows else pd.DataFrame(
        columns=list(columns.LONG_CLUSTERS))
    tracks = pd.concat(track_rows, ignore_index=True) if track_rows else pd.DataFrame(
        columns=list(columns.LONG_TRACKS))
    return {"series": series, "icc": icc, "agreement": agree, "change": change, "slopes": slopes,
            "clusters": clusters, "tracks": tracks, "persistence": longitudinal.persistence_rates(tracks)}


def _compare_one(job: tuple) -> tuple[str, list[dict] | None, str | None]:
    """Agreement rows of one unit: (label, rows or None when it has no other mask, error message)."""
    unit, other_root = job
    try:
        other = agreement.find_other_mask(other_root, unit)
        if other is None:
            return unit.label, None, None
        return unit.label, agreement.compare_unit(unit, other), None
    except (collect.TableError, OSError) as exc:
        return unit.label, [], str(exc)


def run_agreement(units: list, other_root: Path, nprocs: int = 1) -> dict:
    """Per-unit and per-region agreement with the masks of ``other_root`` (units in ``nprocs`` processes)."""
    with Workers(nprocs) as workers:
        return start_agreement(units, other_root, workers)()


def start_agreement(units: list, other_root: Path, workers: Workers):
    """Submit :func:`run_agreement`'s units to ``workers``; return a function that gives its result,
    for the units it is given (``keep``; default all: units found unreadable since are left out)."""
    compared = workers.submit(_compare_one, [(unit, Path(other_root)) for unit in units])

    def result(keep: list | None = None) -> dict:
        kept = None if keep is None else {id(u) for u in keep}
        return _agreement_result([r for u, r in zip(units, compared()) if kept is None or id(u) in kept],
                                 other_root)
    return result


def _agreement_result(results: list, other_root: Path) -> dict:
    """:func:`run_agreement`'s tables from the units' results."""
    rows, missing, errors = [], [], []
    for label, unit_rows, error in results:
        if error is not None:
            LOGGER.error("%s", error)
            errors.append((label, error))
        elif unit_rows is None:
            missing.append(label)
        else:
            rows += unit_rows
    per_unit = pd.DataFrame(rows)
    if missing:
        LOGGER.warning("%d unit(s) have no mask in %s: %s", len(missing), other_root,
                       ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    return {"units": per_unit, "summary": agreement.agreement_summary(per_unit), "missing": missing,
            "errors": errors, "root": str(other_root)}


def _compare_masks(job: tuple) -> tuple[str, list[dict], str | None]:
    """Agreement rows of one unit between two masks (a worker: failures come back as a message)."""
    unit, pred_path, ref_path, extra = job
    try:
        rows = agreement.compare_unit(unit, ref_path, pred_path=pred_path)
    except (collect.TableError, OSError) as exc:
        return unit.label, [], str(exc)
    return unit.label, [{**extra, **row} for row in rows], None


def _with_first(frame: pd.DataFrame, first: list[str]) -> pd.DataFrame:
    return frame[first + [c for c in frame.columns if c not in first]] if len(frame) else frame


def _summaries(per_unit: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """:func:`agreement.agreement_summary` per rater (or rater pair), the ``by`` columns first."""
    if per_unit.empty:
        return pd.DataFrame()
    parts = []
    for values, sub in per_unit.groupby(by, sort=True):
        summary = agreement.agreement_summary(sub)
        for col, value in zip(by, values if isinstance(values, tuple) else (values,)):
            summary[col] = value
        parts.append(summary)
    return _with_first(pd.concat(parts, ignore_index=True), by)


def run_reviewed(units: list, nprocs: int = 1, workers: Workers | None = None) -> dict | None:
    """Automatic results against every reviewed mask, and raters against each other (None without reviews).

    Returns
    -------
    dict or None
        ``reviews`` (:class:`~bids_app.group.reviewed.Review`), ``units`` and ``summary`` (automatic vs
        reviewed: per unit, rater and region; per rater and region), ``interrater`` and
        ``interrater_summary`` (per unit, rater pair and region; per pair and region), ``errors``.
    """
    reviews = reviewed.find_reviews(units)
    if not reviews:
        return None
    pairs = reviewed.rater_pairs(reviews)
    jobs = [(r.unit, None, r.path, {"rater": r.rater}) for r in reviews]
    jobs += [(a.unit, a.path, b.path, {"rater_a": a.rater, "rater_b": b.rater, "mask_a": str(a.path)})
             for a, b in pairs]
    auto_rows, pair_rows, errors = [], [], []
    if workers is None:
        with Workers(nprocs) as own:
            results = own.map(_compare_masks, jobs)
    else:
        results = workers.map(_compare_masks, jobs)
    for label, rows, error in results:
        if error is not None:
            LOGGER.error("%s", error)
            errors.append((label, error))
        for row in rows:
            (pair_rows if "rater_a" in row else auto_rows).append(row)
    keys = ["participant_id", "session_id", "source_entities", "input_sequences"]
    auto = _with_first(pd.DataFrame(auto_rows).rename(columns={"other_mask": "reviewed_mask"}), [*keys, "rater"])
    inter = _with_first(pd.DataFrame(pair_rows).rename(columns={"other_mask": "mask_b"}),
                        [*keys, "rater_a", "rater_b", "mask_a"])
    LOGGER.info("%d reviewed mask(s) by %d rater(s); %d unit(s) reviewed by two or more raters", len(reviews),
                len({r.rater for r in reviews}), len({a.unit.key for a, _ in pairs}))
    return {"reviews": reviews, "units": auto, "summary": _summaries(auto, ["rater"]), "interrater": inter,
            "interrater_summary": _summaries(inter, ["rater_a", "rater_b"]), "errors": errors}


def run_group_level(config: RunConfig) -> int:
    """Write the group tables under ``<out>/group/`` and the report ``<out>/group.html``.

    Returns
    -------
    int
        0, or 65 when a derivative (or a reference mask) could not be read: everything else is
        still written and the unreadable files are listed in ``group/failed.tsv``.

    Raises
    ------
    MissingInputError
        No participant outputs (exit 66), or a ``--covariates`` column missing from
        ``participants.tsv``.
    """
    t0 = time.monotonic()
    with Workers(int(config.nprocs or 1)) as workers:
        return _run_group_level(config, workers, t0)


def _run_group_level(config: RunConfig, workers: Workers, t0: float) -> int:
    """:func:`run_group_level` with its worker processes."""
    output_dir = Path(config.output_dir)
    roots = {kind: root for kind, root in (("reference", config.reference_derivatives),
                                           ("compare", config.compare_dir)) if root is not None}
    pending = {}

    def start(units: list) -> None:  # the agreement runs in the workers while the tables are built
        pending.update({kind: start_agreement(units, Path(root), workers) for kind, root in roots.items()})

    tables = collect_tables(output_dir, config.bids_dir, workers, early=start)
    if config.covariates:
        participants = tables["participants"]
        path = Path(config.bids_dir) / "participants.tsv"
        if participants is None:
            raise MissingInputError("--covariates needs participants.tsv, which is missing or unreadable", path)
        absent = [c for c in config.covariates if c not in participants.columns]
        if absent:
            raise MissingInputError(f"no column(s) {', '.join(absent)} (columns: "
                                    f"{', '.join(participants.columns)})", path)
    init_output_dir(output_dir, config.bids_dir)
    group = output_dir / "group"
    written = [
        _write(group, "cohort", tables["cohort"], {**columns.COHORT, **columns.cohort_region_columns(
            tables["long"]["name"].unique())}),
        _write(group, "cohort_long", tables["long"], columns.LONG),
        _write(group, "regions", stats.region_statistics(tables["long"]), columns.REGIONS),
        _write(group, "qc_outliers", tables["outliers"], columns.OUTLIERS),
        _write(group, "models", tables["models"], columns.MODELS),
    ]
    longi = run_longitudinal(tables, mode=config.longitudinal_matching, seed=config.random_seed, workers=workers)
    if len(longi["series"]):
        written += [_write(group, "longitudinal_icc", longi["icc"], columns.LONG_ICC),
                    _write(group, "longitudinal_agreement", longi["agreement"], columns.LONG_AGREEMENT),
                    _write(group, "longitudinal_change", longi["change"], columns.LONG_CHANGE),
                    _write(group, "longitudinal_slopes", longi["slopes"], columns.LONG_SLOPES)]
        if config.longitudinal_matching != "none":
            written += [_write(group, "longitudinal_clusters", longi["clusters"], columns.LONG_CLUSTERS),
                        _write(group, "longitudinal_cluster_tracks", longi["tracks"], columns.LONG_TRACKS),
                        _write(group, "longitudinal_persistence", longi["persistence"], columns.LONG_PERSISTENCE)]
    comparisons = {}
    for kind, root in roots.items():
        res = pending[kind](keep=tables["units"])
        comparisons[kind] = res
        for label, message in res["errors"]:
            tables["failed"].loc[len(tables["failed"])] = [label, "unreadable", EXIT_DATAERR, message]
        if len(res["units"]):
            written += [_write(group, f"agreement-{kind}_units", res["units"], columns.AGREEMENT_UNITS),
                        _write(group, f"agreement-{kind}_summary", res["summary"],
                               columns.agreement_summary_columns(res["summary"].columns))]
        elif not res["errors"]:
            raise MissingInputError(f"no ePVS mask (*_label-PVS*_mask.nii.gz) for any of the "
                                    f"{len(tables['units'])} unit(s)", root)
    rev = run_reviewed(tables["units"], workers=workers)
    if rev is not None:
        for label, message in rev["errors"]:
            tables["failed"].loc[len(tables["failed"])] = [label, "unreadable", EXIT_DATAERR, message]
        for name, key, sidecar in (("reviewed_agreement", "units", columns.REVIEWED_UNITS),
                                   ("reviewed_agreement_summary", "summary", None),
                                   ("interrater_agreement", "interrater", columns.INTERRATER_UNITS),
                                   ("interrater_agreement_summary", "interrater_summary", None)):
            if len(rev[key]):
                written.append(_write(group, name, rev[key], sidecar or columns.reviewed_summary_columns(
                    rev[key].columns)))
    assoc = None
    if config.covariates:
        assoc = stats.associations(tables["long"], tables["participants"], list(config.covariates),
                                   longi["series"])
        written.append(_write(group, "associations", assoc, columns.ASSOCIATIONS))
    written.append(_write(group, "failed", tables["failed"], columns.FAILED))

    from ..reports.group import write_group_report

    report = write_group_report(output_dir / "group.html", tables=tables, longitudinal=longi,
                                comparisons=comparisons, reviewed=rev, associations=assoc,
                                covariates=list(config.covariates or []),
                                outputs=[str(p.relative_to(output_dir)) for p in written])
    n_failed = int((tables["failed"]["status"] != "not_run").sum()) if len(tables["failed"]) else 0
    LOGGER.info("group level: %d unit(s) of %d participant(s) in %s; %d failed or unreadable unit(s) in %s; "
                "report %s (%.1f s)", len(tables["cohort"]), tables["cohort"]["participant_id"].nunique(),
                group / "cohort.tsv", n_failed, group / "failed.tsv", report, time.monotonic() - t0)
    unreadable = tables["unreadable"] + sum(len(c["errors"]) for c in comparisons.values()) + (
        len(rev["errors"]) if rev is not None else 0)
    if unreadable:
        LOGGER.error("%d derivative file(s) could not be read: see %s", unreadable, group / "failed.tsv")
        return InputError.exit_code
    return EXIT_OK

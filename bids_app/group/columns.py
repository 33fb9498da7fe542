"""Descriptions of every column of the group tables, written as the tables' JSON sidecars."""

from __future__ import annotations

from epvsseg import metrics

_KEY = {
    "unit": {"Description": "Unit identifier: the reference image's entities and the input combination "
                            "(<stem>_desc-<combination>), as in the participant outputs' names"},
    "participant_id": {"Description": "BIDS participant label, with the sub- prefix"},
    "session_id": {"Description": "BIDS session label, with the ses- prefix (n/a without sessions)"},
    "source_entities": {"Description": "Other entities of the reference image (acq, run...), as in the file name"},
    "input_sequences": {"Description": "Sequences the detector used (the outputs' desc entity)"},
}
_REGION = {
    "name": {"Description": "Region and hemisphere, e.g. basal_ganglia_left; whole_brain for the whole brain"},
    "region": {"Description": "Anatomical region (basal_ganglia, centrum_semiovale, thalamus, midbrain, "
                              "hippocampus, insula, frontal_wm, parietal_wm, temporal_wm, occipital_wm, other, "
                              "or whole_brain)"},
    "hemisphere": {"Description": "left, right or bilateral"},
}
_MEASURES = {
    "n_clusters": {"LongName": "ePVS count", "Description": "Number of 26-connected ePVS clusters "
                   "(per region: as assigned by the participant level)", "Units": "clusters"},
    "volume_mm3": {"LongName": "ePVS volume", "Description": "Total ePVS volume", "Units": "mm^3"},
    "volume_ppm_icv": {"Description": "1e6 x ePVS volume / intracranial volume (n/a without ICV)",
                       "Units": "ppm"},
    "region_volume_mm3": {"Description": "Volume of the region (whole brain: the brain mask)", "Units": "mm^3"},
    "volume_fraction": {"Description": "ePVS volume / region volume", "Units": "1"},
    "mean_cluster_volume_mm3": {"Description": "ePVS volume / count (n/a without clusters)", "Units": "mm^3"},
}

COHORT = {
    **_KEY,
    "method": {"Description": "Detection method of the unit (EpvsMethod of the ePVS-mask sidecar: unet or frangi); "
                              "n/a when the sidecar is absent"},
    "model_id": {"Description": "Model that produced the unit (ModelId of the ePVS-mask sidecar; frangi for the "
                                "Frangi method); n/a when the sidecar is absent"},
    "weights_sha256": {"Description": "sha256 of the model's weights file (Parameters.weights_sha256 of the "
                                      "ePVS-mask sidecar); n/a for Frangi or when the sidecar is absent"},
    "n_clusters": _MEASURES["n_clusters"],
    "total_volume_mm3": {"LongName": "ePVS volume", "Description": "Total ePVS volume", "Units": "mm^3"},
    "median_cluster_volume_mm3": {"Description": "Median volume of one ePVS cluster", "Units": "mm^3"},
    "brain_volume_mm3": {"Description": "Volume of the brain mask", "Units": "mm^3"},
    "icv_mm3": {"Description": "Intracranial volume (IntracranialVolume_mm3 of the brain-mask sidecar)",
                "Units": "mm^3"},
    "volume_ppm_brain": {"LongName": "Brain-normalised ePVS volume",
                         "Description": "1e6 x total_volume_mm3 / brain_volume_mm3", "Units": "ppm"},
    "volume_ppm_icv": {"LongName": "ICV-normalised ePVS volume",
                       "Description": "1e6 x total_volume_mm3 / icv_mm3", "Units": "ppm"},
    "snr": {"Description": "Signal-to-noise ratio of the reference image (participant QC)", "Units": "1"},
    "cnr": {"Description": "Contrast-to-noise ratio of the reference image (participant QC)", "Units": "1"},
    "registration_ok": {"Description": "True when every registration of the unit passed its check "
                                       "(participant QC); n/a when not recorded"},
    "brain_mask_ok": {"Description": "False when the brain mask failed its QC (volume, background share or "
                                     "template agreement; docs/preprocessing.md): no region rows and no ICV for "
                                     "the unit; n/a when not recorded"},
    "brain_mask_background_share": {"Description": "Share of brain-mask voxels at ~0 image intensity (empty "
                                                   "background; flagged above 0.01)", "Units": "1"},
    "participant_qc_flags": {"Description": "The participant level's QC flags, separated by '; '"},
    "potter_bg": {"Description": "Estimated Potter/Doubal basal-ganglia grade 0-4 from the segmentation "
                                 "(VisualRatingEstimates of the seg-PVSregions sidecar; docs/usage.md)"},
    "potter_cso": {"Description": "Estimated Potter/Doubal centrum-semiovale grade 0-4 (as potter_bg)"},
    "zhu_bg": {"Description": "Estimated Zhu basal-ganglia grade 1-4 (as potter_bg)"},
    "zhu_wm": {"Description": "Estimated Zhu white-matter grade 1-4 (as potter_bg)"},
    "qc_outlier": {"Description": "Whole-brain measures outside Tukey's fences in this cohort "
                                  "(see qc_outliers.tsv), separated by '; '"},
    "age": {"Description": "Age from sessions.tsv (per session) or participants.tsv of the raw dataset",
            "Units": "years"},
    "acq_datetime": {"Description": "Acquisition date-time of the reference image (sessions.tsv, scans.tsv "
                                    "or the image sidecar); n/a when unknown"},
    "report": {"Description": "The participant report, relative to the output folder"},
}


def cohort_region_columns(names) -> dict:
    """Sidecar entries of the wide table's per-region columns ``<name>__<measure>``."""
    out = {}
    for name in names:
        for measure in ("n_clusters", "volume_mm3", "volume_ppm_icv"):
            entry = dict(_MEASURES[measure])
            entry["Description"] = f"{entry['Description']}, region {name}"
            out[f"{name}__{measure}"] = entry
    return out


LONG = {**_KEY, **_REGION, **_MEASURES}

MODELS = {
    "method": COHORT["method"], "model_id": COHORT["model_id"], "weights_sha256": COHORT["weights_sha256"],
    "n_units": {"Description": "Units produced by this model and weights"},
    "n_participants": {"Description": "Participants among them"},
    "median_n_clusters": {"Description": "Median whole-brain ePVS count of those units", "Units": "clusters"},
    "median_total_volume_mm3": {"Description": "Median whole-brain ePVS volume of those units", "Units": "mm^3"},
    "median_volume_ppm_icv": {"Description": "Median ICV-normalised whole-brain ePVS volume (n/a without ICV)",
                              "Units": "ppm"},
}

REGIONS = {
    **_REGION,
    "measure": {"Description": "The long table's column summarised (see cohort_long.json for its unit)"},
    "n_units": {"Description": "Units with a value"},
    "mean": {"Description": "Mean, in the measure's unit"},
    "sd": {"Description": "Standard deviation (ddof=1)"},
    "median": {"Description": "Median"},
    "q1": {"Description": "First quartile (linear interpolation)"},
    "q3": {"Description": "Third quartile"},
    "min": {"Description": "Minimum"},
    "max": {"Description": "Maximum"},
    "n_zero": {"Description": "Units whose value is 0"},
}

OUTLIERS = {
    **_KEY,
    "measure": {"Description": "Whole-brain measure (cohort.tsv column), or participant_qc"},
    "value": {"Description": "The unit's value"},
    "q1": {"Description": "First quartile in the cohort"},
    "q3": {"Description": "Third quartile in the cohort"},
    "lower_fence": {"Description": "q1 - 1.5 x (q3 - q1)"},
    "upper_fence": {"Description": "q3 + 1.5 x (q3 - q1)"},
    "flag": {"Description": "high or low (Tukey), or the participant level's QC flag"},
    "source": {"Description": "tukey or participant_qc"},
}

FAILED = {
    "unit": {"Description": "Unit label (sub-<l>[_ses-<s>]) or derivative stem"},
    "status": {"Description": "failed (the participant level failed), incomplete (marked complete but its "
                              "tables are missing), unreadable (a derivative the group level cannot read), "
                              "not_run (in the raw dataset, never processed)"},
    "exit_code": {"Description": "Exit code of the participant level (n/a when not applicable)"},
    "message": {"Description": "Why, naming the file at fault"},
}

_ICC = {
    "kind": {"Description": "ICC(1,1), ICC(2,1), ICC(3,1) (single measure) and ICC(1,k), ICC(2,k), ICC(3,k) "
                            "(mean of k) of Shrout & Fleiss (1979); McGraw & Wong's ICC(A,*) and ICC(C,*) are "
                            "ICC(2,*) and ICC(3,*). Longitudinal tables add ICC(1,1)-REML and ICC(3,1)-REML: "
                            "a linear mixed model with a random participant intercept (and a fixed effect per "
                            "visit for ICC(3,1)-REML) fitted by REML on every session (unbalanced designs)"},
    "value": {"Description": "Intraclass correlation", "Units": "1"},
    "ci_low": {"Description": "Lower bound of the 95% confidence interval"},
    "ci_high": {"Description": "Upper bound of the 95% confidence interval"},
    "f": {"Description": "F statistic of the test of ICC = 0"},
    "df1": {"Description": "Numerator degrees of freedom"},
    "df2": {"Description": "Denominator degrees of freedom"},
    "p_value": {"Description": "One-sided p-value of the F test"},
    "n": {"Description": "Participants (targets)"},
    "k": {"Description": "Sessions (raters)"},
}

LONG_ICC = {**_REGION, "measure": {"Description": "Measure compared across sessions"}, **_ICC,
            "ci_low": {"Description": "Lower bound of the 95% confidence interval (REML forms: profile likelihood)"},
            "k": {"Description": "Sessions (visits) in the model: ANOVA forms, the k leading visits with the "
                                 "largest k x n complete table; REML forms, every visit"},
            "n": {"Description": "Participants: ANOVA forms, those with all k visits; REML forms, all"},
            "n_observations": {"Description": "Values used (sessions x participants)"},
            "design": {"Description": "balanced (every participant has every visit) or unbalanced"}}

LONG_SLOPES = {
    **_REGION, "measure": {"Description": "Measure modelled over time"},
    "time_unit": {"Description": "year (time since the first session from dates or ages) or session (position "
                                 "0, 1, 2... when some series has neither)"},
    "time_source": {"Description": "acq_datetime, age (sessions.tsv), both joined by +, or order"},
    "intercept": {"Description": "Fixed intercept: the mean value at the first session"},
    "slope": {"Description": "Fixed slope of a REML linear mixed model with a random intercept per participant: "
                             "change of the measure per time unit"},
    "se": {"Description": "Standard error of the slope"},
    "ci_low": {"Description": "Lower bound of the 95% Wald interval of the slope"},
    "ci_high": {"Description": "Upper bound of the 95% Wald interval of the slope"},
    "z": {"Description": "slope / se"},
    "p_value": {"Description": "Two-sided p-value of slope = 0 (normal)"},
    "n_participants": {"Description": "Participants (series) with a value"},
    "n_observations": {"Description": "Sessions with a value"},
    "sd_subject": {"Description": "SD of the participant intercepts, in the measure's unit"},
    "sd_residual": {"Description": "Residual SD within participants, in the measure's unit"},
}

_BA = {f"ba_{name}": {"Description": desc} for name, desc in (
    ("n", "Pairs (participants with both sessions)"),
    ("bias", "Bland-Altman mean difference, second - first session, in the measure's unit"),
    ("sd", "SD of the differences"),
    ("loa_low", "Lower 95% limit of agreement, bias - 1.96 SD"),
    ("loa_high", "Upper 95% limit of agreement, bias + 1.96 SD"),
    ("bias_ci_low", "Lower bound of the 95% confidence interval of the bias"),
    ("bias_ci_high", "Upper bound of the 95% confidence interval of the bias"),
    ("loa_se", "Approximate standard error of each limit, sqrt(3 SD^2 / n)"),
)}
assert {f"ba_{f}" for f in metrics.BlandAltman.__dataclass_fields__} == set(_BA)

LONG_AGREEMENT = {
    **_REGION, "measure": {"Description": "Measure compared across sessions"},
    "n_participants": {"Description": "Participants with two or more sessions with a value"},
    "n_sessions": {"Description": "Their sessions"},
    "wcv": {"Description": "Within-subject coefficient of variation, sqrt(mean_i(SD_i^2 / mean_i^2)) over all "
                           "sessions (participants with mean 0 left out)", "Units": "1"},
    **_BA,
}

LONG_CHANGE = {
    "participant_id": _KEY["participant_id"], "input_sequences": _KEY["input_sequences"], **_REGION,
    "first_session": {"Description": "First session (by acquisition date when all are known, else label)"},
    "last_session": {"Description": "Last session"},
    "n_sessions": {"Description": "Sessions of the participant with this input combination"},
    "interval_years": {"Description": "Time between the first and last acquisition (days / 365.25); n/a "
                                      "when a date is unknown", "Units": "years"},
    "n_clusters_first": {"Description": "ePVS count at the first session", "Units": "clusters"},
    "n_clusters_last": {"Description": "ePVS count at the last session", "Units": "clusters"},
    "n_clusters_change": {"Description": "Last - first count", "Units": "clusters"},
    "volume_mm3_first": {"Description": "ePVS volume at the first session", "Units": "mm^3"},
    "volume_mm3_last": {"Description": "ePVS volume at the last session", "Units": "mm^3"},
    "volume_mm3_change": {"Description": "Last - first volume", "Units": "mm^3"},
    "n_clusters_per_year": {"Description": "Annualised count change", "Units": "clusters/year"},
    "volume_mm3_per_year": {"Description": "Annualised volume change", "Units": "mm^3/year"},
    "volume_ppm_icv_per_year": {"Description": "Annualised change of the ICV-normalised volume",
                                "Units": "ppm/year"},
}

LONG_CLUSTERS = {
    "participant_id": _KEY["participant_id"], "input_sequences": _KEY["input_sequences"],
    "baseline_session": {"Description": "Earlier session of a consecutive pair (matching is chained: ses-1 -> "
                                        "ses-2 -> ses-3); the space clusters are matched in"},
    "followup_session": {"Description": "The next session"},
    "name": _REGION["name"],
    "n_baseline": {"Description": "Clusters at the first session (region by majority voxel)", "Units": "clusters"},
    "n_followup": {"Description": "Clusters at the later session", "Units": "clusters"},
    "persisting": {"Description": "First-session clusters matched by a later cluster (overlap after "
                                  "registration, or centroids within the tolerance)", "Units": "clusters"},
    "vanished": {"Description": "First-session clusters without a match", "Units": "clusters"},
    "new": {"Description": "Later clusters without a match", "Units": "clusters"},
    "method": {"Description": "rigid (registered) or header (scanner coordinates as they are)"},
    "registration_ok": {"Description": "False when the registration check failed: treat the counts with care"},
    "mi_before": {"Description": "Mattes mutual information before registration (more negative is better)"},
    "mi_after": {"Description": "Mattes mutual information after registration"},
    "tolerance_mm": {"Description": "Centroid distance within which clusters match", "Units": "mm"},
}

AGREEMENT_UNITS = {
    **_KEY, "other_mask": {"Description": "The reference (or compared) mask"}, **_REGION,
    "voxel_sensitivity": {"Description": "|ours AND other| / |other| (voxels)", "Units": "1"},
    "voxel_precision": {"Description": "|ours AND other| / |ours| (voxels)", "Units": "1"},
    "dice": {"Description": "Voxel Dice, 2|ours AND other| / (|ours| + |other|)", "Units": "1"},
    "volumetric_similarity": {"Description": "1 - ||ours| - |other|| / (|ours| + |other|)", "Units": "1"},
    "n_ref_clusters": {"Description": "26-connected clusters of the other mask", "Units": "clusters"},
    "n_pred_clusters": {"Description": "26-connected clusters of this run's mask", "Units": "clusters"},
    "cluster_sensitivity": {"Description": "Fraction of the other mask's clusters overlapped by this run's mask",
                            "Units": "1"},
    "cluster_precision": {"Description": "Fraction of this run's clusters overlapping the other mask",
                          "Units": "1"},
    "cluster_f1": {"Description": "Harmonic mean of cluster sensitivity and precision", "Units": "1"},
    "magnitude_accuracy": {"Description": "sqrt(S^2 + P^2) of the cluster sensitivity S and precision P "
                                          "(Rashid et al. 2023); at most sqrt(2)", "Units": "1"},
    "hd95_mm": {"Description": "95th percentile of the symmetric surface distance", "Units": "mm"},
    "ref_volume_mm3": {"Description": "Volume of the other mask", "Units": "mm^3"},
    "pred_volume_mm3": {"Description": "Volume of this run's mask", "Units": "mm^3"},
}


_REVIEW_NOTE = ("In the reviewed tables 'this run' is the automatic mask (inter-rater: rater A) and 'the other' "
                "the reviewed mask (inter-rater: rater B)")
#: ``reviewed_agreement.tsv``: automatic mask vs a rater's reviewed mask, per unit, rater and region.
REVIEWED_UNITS = {
    **AGREEMENT_UNITS,
    "rater": {"Description": "Rater tag of the reviewed mask (its desc-reviewed<tag> entity). " + _REVIEW_NOTE},
    "reviewed_mask": {"Description": "The reviewed mask (the reference)"},
}
#: ``interrater_agreement.tsv``: rater A's reviewed mask vs rater B's, per unit and region.
INTERRATER_UNITS = {
    **AGREEMENT_UNITS,
    "rater_a": {"Description": "Rater A (the first tag in alphabetical order): the 'prediction'. " + _REVIEW_NOTE},
    "rater_b": {"Description": "Rater B: the 'reference'"},
    "mask_a": {"Description": "Rater A's reviewed mask"},
    "mask_b": {"Description": "Rater B's reviewed mask"},
}


def reviewed_summary_columns(columns) -> dict:
    """Sidecar of ``reviewed_agreement_summary.tsv`` and ``interrater_agreement_summary.tsv``."""
    out = agreement_summary_columns(columns)
    out.update({k: v for k, v in {**REVIEWED_UNITS, **INTERRATER_UNITS}.items() if k.startswith("rater")})
    for col in columns:
        if col.startswith(("count_icc", "volume_icc", "count_ba", "volume_ba")):
            out[col] = {**out[col], "Description": out[col]["Description"] + ". " + _REVIEW_NOTE}
    return out


def agreement_summary_columns(columns) -> dict:
    """Sidecar of the agreement summary (columns generated from the per-unit measures)."""
    out = {**_REGION, "n_units": {"Description": "Units compared"}}
    for col in columns:
        if col in out:
            continue
        if col.startswith("mean_"):
            base = AGREEMENT_UNITS.get(col[5:], {})
            out[col] = {**base, "Description": "Mean over units of: " + base.get("Description", col[5:])}
        elif col.startswith(("count_", "volume_")):
            what, _, rest = col.partition("_")
            unit = "clusters" if what == "count" else "mm^3"
            desc = {"icc": "ICC(2,1) (two-way random, absolute agreement) of this run vs the other, over units",
                    "icc_ci_low": "Lower bound of its 95% confidence interval",
                    "icc_ci_high": "Upper bound of its 95% confidence interval",
                    "icc_p": "p-value of its F test",
                    "ba_bias": f"Bland-Altman bias (this run - other) in {unit}",
                    "ba_loa_low": f"Lower 95% limit of agreement in {unit}",
                    "ba_loa_high": f"Upper 95% limit of agreement in {unit}"}[rest]
            out[col] = {"Description": f"{what}: {desc}"}
        else:
            out[col] = {"Description": {
                "median_sensitivity": "Median cluster sensitivity over units",
                "median_precision": "Median cluster precision over units",
                "magnitude_of_medians": "sqrt(median_sensitivity^2 + median_precision^2)"}.get(col, col)}
    return out


ASSOCIATIONS = {
    **_REGION,
    "outcome": {"Description": "ppm_icv (1e6 x ePVS volume / ICV) or ppm_brain (/ brain volume, outputs "
                               "without ICV)"},
    "term": {"Description": "Model term: intercept, a numeric covariate, or <covariate>[T.<level>] against "
                            "the first level"},
    "estimate": {"Description": "OLS coefficient (ppm per covariate unit)", "Units": "ppm"},
    "se": {"Description": "Standard error"},
    "t": {"Description": "t statistic"},
    "p_value": {"Description": "Two-sided p-value"},
    "ci_low": {"Description": "Lower bound of the 95% confidence interval"},
    "ci_high": {"Description": "Upper bound of the 95% confidence interval"},
    "n": {"Description": "Participants in the model (first session, complete covariates)"},
    "r_squared": {"Description": "Coefficient of determination of the model"},
}

LONG_TRACKS = {
    "participant_id": _KEY["participant_id"], "input_sequences": _KEY["input_sequences"],
    "track": {"Description": "Cluster track number within the series (a cluster followed through the sessions)"},
    "name": {"Description": "Region of the cluster at its first appearance (majority voxel label)"},
    "presence": {"Description": "One character per session of the series in order: + present, - absent (+-+: absent at the "
                                "second of three sessions)"},
    "trajectory": {"Description": "persistent (every session), vanishes (present from the first, absent from some "
                                  "session on), appears (absent at first, present to the last), transient "
                                  "(appears then vanishes), reappears (absent between two sessions where present)"},
    "n_present": {"Description": "Sessions where the track is present"},
    "first_session": {"Description": "First session where present"},
    "last_session": {"Description": "Last session where present"},
    "volume_first_mm3": {"Description": "Volume at the first session where present (clusters merged into the track "
                                        "summed)", "Units": "mm^3"},
    "volume_last_mm3": {"Description": "Volume at the last session where present", "Units": "mm^3"},
}

LONG_PERSISTENCE = {
    "name": _REGION["name"],
    "n_participants": {"Description": "Participants (series) with a cluster track in the region"},
    "n_tracks": {"Description": "Cluster tracks", "Units": "clusters"},
    **{k: {"Description": f"Tracks whose trajectory is {k}", "Units": "clusters"}
       for k in ("persistent", "vanishes", "appears", "transient", "reappears")},
    "n_first": {"Description": "Tracks present at the first session", "Units": "clusters"},
    "persistence_rate": {"Description": "persistent / n_first: fraction of first-session clusters present at every "
                                        "later session", "Units": "1"},
}

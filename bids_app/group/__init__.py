"""Group level: cohort tables, regional statistics, QC outliers, longitudinal reliability and
change, agreement with reference masks, covariate models and the group report, from the
participant derivatives only (plus the raw dataset's ``participants.tsv``, ``sessions.tsv``,
``scans.tsv`` and sidecars for ages, dates and covariates).

Modules: :mod:`.collect` (reading), :mod:`.stats` (pure statistics on tables),
:mod:`.longitudinal` (cluster matching across sessions), :mod:`.agreement` (reference masks),
:mod:`.columns` (sidecars), :mod:`.run` (the runner).
"""

from .run import collect_tables, failed_units, run_group_level

__all__ = ["collect_tables", "failed_units", "run_group_level"]

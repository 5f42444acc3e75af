"""Declarative automation conditions shared by the assets (public Dagster idioms).

- ``BUILD``: materialize when an upstream's *data version* changed (not merely re-materialized with the
  same content), when this asset's ``code_version`` was bumped, or on the first evaluation if it is
  missing and its inputs exist (plain ``eager()`` never builds assets that are already missing).
- ``REPORT``: for the dbt reports over partitioned evaluations: fire on updates even while some
  evaluation cells are still missing, but not before the other reports a report reads exist. No
  bootstrap clause: with no probe set registered yet an evaluation has zero partitions, none
  "missing", and a bootstrap would run a report over no files.

The weekly attack suite has no condition of its own: the resurgence asset is ``BUILD`` (rebuilt when
its inputs change) and the ``weekly_resurgence`` schedule is its one clock (jobs/schedules.py), so a
tick starts one run, not two.
"""

from __future__ import annotations

import dagster as dg

AC = dg.AutomationCondition

BOOTSTRAP = (AC.initial_evaluation() & AC.missing() & ~AC.any_deps_missing() & ~AC.in_progress()).with_label(
    "bootstrap"
)
DATA_EAGER = AC.eager().replace("newly_updated", AC.data_version_changed())
BUILD = (DATA_EAGER | AC.code_version_changed() | BOOTSTRAP).with_label("memkfac_build")
# a report waits for the reports it reads (not for every evaluation cell)
_REPORT_INPUTS_MISSING = AC.any_deps_match(AC.missing()).allow(dg.AssetSelection.groups("reports"))
REPORT = (
    (AC.eager().without(~AC.any_deps_missing()) | AC.code_version_changed()) & ~_REPORT_INPUTS_MISSING
).with_label("memkfac_report")

"""Where every artifact of the pipeline lives under the data root (``MEMKFAC_HOME``).

Assets write large artifacts (checkpoints, factors, Parquet) by path through this resource; nothing
large passes through a Dagster IO manager. Every name becomes a path component only after
``memkfac.paths.safe_name``, so no partition key or configured name can point outside the root.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from memkfac.paths import safe_name


class ArtifactStore(dg.ConfigurableResource):
    """Path layout of the data root. ``home`` is an absolute directory (from ``MEMKFAC_HOME``)."""

    home: str

    @property
    def root(self) -> Path:
        return Path(self.home)

    def probe_file(self, probe_set: str) -> Path:
        """An input probe-set file: drop ``<name>.jsonl`` here and the sensor picks it up."""
        return self.probes_dir / f"{safe_name(probe_set, 'probe-set name')}.jsonl"

    @property
    def probes_dir(self) -> Path:
        return self.root / "probes"

    def probe_set_dir(self, probe_set: str) -> Path:
        return self.root / "probe_sets" / safe_name(probe_set, "probe-set name")

    def validated_probes(self, probe_set: str) -> Path:
        """The validated copy of a probe set: what every step that reads the probe set reads."""
        return self.probe_set_dir(probe_set) / "probes.jsonl"

    def injected_model_dir(self, model: str) -> Path:
        return self.root / "injected" / safe_name(model, "model name")

    def corpus_dir(self, model: str) -> Path:
        """Corpus splits tokenized with ``model``'s tokenizer."""
        return self.root / "corpora" / safe_name(model, "model name")

    def factor_dir(self, model: str) -> Path:
        return self.root / "factors" / safe_name(model, "model name")

    def eigen_dir(self, model: str) -> Path:
        return self.root / "eigen" / safe_name(model, "model name")

    def edit_dir(self, variant: str) -> Path:
        return self.root / "edits" / safe_name(variant, "variant")

    def eval_table(self, table: str, variant: str, probe_set: str = "none") -> Path:
        """``evals/<table>/variant=<v>/probe_set=<p>/part.parquet`` (hive layout, read by dbt)."""
        return (
            self.root
            / "evals"
            / safe_name(table, "table")
            / f"variant={safe_name(variant, 'variant')}"
            / f"probe_set={safe_name(probe_set, 'probe-set name')}"
            / "part.parquet"
        )

    @property
    def duckdb_path(self) -> Path:
        return self.root / "reports.duckdb"

"""The downstream suite: generated lm-eval tasks, runs of lm-evaluation-harness, and retention with CIs.

The project's own tasks (memkfac.tasks) are written as local lm-eval tasks (one JSONL file plus one task
YAML each) and loaded with ``TaskManager(include_path=...)``, so the suite runs fully offline. Any other
name in a suite is an lm-eval registry task (boolq, arc_easy, ...) and runs when the Hub is reachable.

Retention (paper section 6, Fig. 3) is edited score / base score per task. Its confidence interval comes
from a paired bootstrap over items: the same resampled items score both models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from memkfac.arguments import Checks
from memkfac.errors import MemkfacError
from memkfac.fingerprint import model_fingerprint
from memkfac.paths import ArtifactKind, atomic_dir, memkfac_home, read_json_object, safe_name, write_json
from memkfac.tasks import GENERATORS, generate_items

TASK_PREFIX = "memkfac_"
DEFAULT_SUITE: tuple[str, ...] = tuple(GENERATORS)
MIN_ITEMS = 200
# Metrics read per item, in order of preference: log-likelihood accuracy first.
_ITEM_METRICS = ("acc", "exact_match", "acc_norm", "f1")

_TASK_YAML = """\
task: {task}
tag: memkfac_suite
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
  seed: {seed}
  category: {category}
"""


@dataclass
class DownstreamArguments:
    """What to run: ``tasks`` mixes generated names (memkfac.tasks.GENERATORS) and lm-eval registry names."""

    tasks: tuple[str, ...] = DEFAULT_SUITE
    n_items: int = MIN_ITEMS  # items per generated task (>= 200)
    seed: int = 0
    batch_size: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    num_fewshot: int | None = None  # registry tasks only; generated tasks carry their own shots
    limit: int | None = None  # registry tasks only: first N documents

    def __post_init__(self):
        check = Checks()
        check.require(
            bool(self.tasks), "tasks", "no downstream tasks", f"name some of {', '.join(GENERATORS)}"
        )
        for task in self.tasks:
            with check.field("tasks"):
                safe_name(task, "task name")
        check.require(
            self.num_fewshot is None or not any(t in GENERATORS for t in self.tasks),
            "num_fewshot",
            "num_fewshot applies to every task, but generated tasks carry their own examples",
            "run registry tasks with num_fewshot in a separate call from the generated suite",
        )
        check.at_least("n_items", self.n_items, MIN_ITEMS)
        check.at_least("batch_size", self.batch_size, 1)
        check.at_least("num_fewshot", self.num_fewshot, 0)
        check.at_least("limit", self.limit, 1)
        check.done()


@dataclass
class TaskResult:
    """One task's outcome: the aggregate and the per-item scores that retention resamples."""

    task: str  # the name in the suite ("arithmetic", "boolq")
    category: str  # "closed-book", "math", ... or "registry"
    metric: str  # "acc" for the generated tasks
    score: float  # mean of item_scores
    doc_ids: np.ndarray  # (n,) int64, lm-eval document ids
    item_scores: np.ndarray  # (n,) float64, 1.0 correct / 0.0 wrong for accuracy


@dataclass
class Retention:
    """edited / base on one task, with a paired-bootstrap percentile interval."""

    task: str
    base_score: float
    edited_score: float
    retention: float  # edited_score / base_score; nan when base_score == 0
    ci_low: float
    ci_high: float
    n_items: int
    n_boot: int
    confidence: float


TASK_SUITE = ArtifactKind("task_suite", "a generated downstream task suite", signature="suite.json")


def default_task_dir(n_items: int, seed: int, root: Path | None = None) -> Path:
    """Where a generated suite lives by default: ``<root or MEMKFAC_HOME>/tasks/seed=<s>-n=<n>``."""
    return (memkfac_home() if root is None else Path(root)) / "tasks" / f"seed={seed}-n={n_items}"


def write_task_suite(
    out_dir: Path, n_items: int = MIN_ITEMS, seed: int = 0, inputs: Sequence[Path] = ()
) -> Path:
    """Write every generated task as an lm-eval task in ``out_dir``; return ``out_dir``.

    Writes ``<task>.jsonl`` and ``<task>.yaml`` per task (lm-eval name ``memkfac_<task>``) and
    ``suite.json`` (seed, items, sha256 of each JSONL). Generation takes milliseconds, so the items are
    always regenerated; a directory that already holds exactly these files is left untouched, an
    earlier suite is replaced, and a directory holding anything else, or overlapping ``inputs``, is
    refused.
    """
    if n_items < MIN_ITEMS:
        raise MemkfacError(
            f"{n_items} items per task is too few for a stable retention estimate",
            f"use at least {MIN_ITEMS} items per task",
        )
    out_dir = Path(out_dir).resolve()
    files = {}
    for task, (_, category, _) in GENERATORS.items():
        items = generate_items(task, n_items, seed)
        files[f"{task}.jsonl"] = "".join(json.dumps(item, sort_keys=True) + "\n" for item in items)
        # lm-eval resolves data_files against the working directory, so the YAML names the final path.
        files[f"{task}.yaml"] = _TASK_YAML.format(
            task=TASK_PREFIX + task,
            seed=seed,
            category=category,
            data=json.dumps(str(out_dir / f"{task}.jsonl")),
        )
    manifest = {
        "seed": seed,
        "n_items": n_items,
        "tasks": {
            task: {
                "file": f"{task}.jsonl",
                "category": category,
                "choices": n_choices,
                "sha256": hashlib.sha256(files[f"{task}.jsonl"].encode()).hexdigest(),
            }
            for task, (_, category, n_choices) in GENERATORS.items()
        },
    }
    files["suite.json"] = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    if all(
        (out_dir / name).is_file() and (out_dir / name).read_text() == text for name, text in files.items()
    ):
        return out_dir
    with atomic_dir(out_dir, TASK_SUITE, overwrite=True, inputs=inputs) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)
    return out_dir


def _item_metric(sample: dict) -> str:
    for name in _ITEM_METRICS:
        if name in sample:
            return name
    return sample["metrics"][0]


def run_downstream(
    model_dir: Path, args: DownstreamArguments, task_dir: Path | None = None, progress: bool = True
) -> dict[str, TaskResult]:
    """Evaluate the HF model in ``model_dir`` on the suite with lm-eval's ``simple_evaluate``.

    Generated tasks are (re)written into ``task_dir`` (default ``default_task_dir``) first. Returns one
    ``TaskResult`` per task (per subtask for registry groups such as bbh), keyed by suite name.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from memkfac.devices import resolve_device, resolve_dtype

    resolve_dtype(args.dtype, resolve_device(args.device))  # before lm-eval loads anything
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise MemkfacError(
            f"{model_dir} is not a Hugging Face model directory (no config.json)",
            "pass a directory written by save_pretrained, e.g. an edited checkpoint",
        )
    task_dir = Path(task_dir) if task_dir is not None else default_task_dir(args.n_items, args.seed)
    write_task_suite(task_dir, args.n_items, args.seed, inputs=[model_dir])
    names = [TASK_PREFIX + t if t in GENERATORS else t for t in args.tasks]
    manager = TaskManager(
        include_path=str(task_dir), include_defaults=any(t not in GENERATORS for t in args.tasks)
    )
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        raise MemkfacError(
            f"unknown downstream task(s): {', '.join(missing)}",
            f"use generated tasks ({', '.join(GENERATORS)}) or lm-eval registry task names",
        )
    logging.getLogger("lm_eval").setLevel(logging.INFO if progress else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": args.dtype},
        tasks=names,
        task_manager=manager,
        device=args.device,
        batch_size=args.batch_size,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        log_samples=True,
        bootstrap_iters=0,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
        verbosity="INFO" if progress else "WARNING",
    )
    results = {}
    for lm_name, samples in out["samples"].items():
        task = lm_name.removeprefix(TASK_PREFIX)
        samples = sorted(samples, key=lambda s: s["doc_id"])
        metric = _item_metric(samples[0])
        scores = np.array([float(s[metric]) for s in samples], dtype=np.float64)
        results[task] = TaskResult(
            task=task,
            category=GENERATORS[task][1] if task in GENERATORS else "registry",
            metric=metric,
            score=float(scores.mean()),
            doc_ids=np.array([s["doc_id"] for s in samples], dtype=np.int64),
            item_scores=scores,
        )
    return results


def paired_bootstrap_retention(
    base: np.ndarray, edited: np.ndarray, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Retention mean(edited) / mean(base) and its percentile CI from a paired bootstrap over items.

    ``base`` and ``edited`` are (n,) per-item scores of the same items. Each replicate resamples item
    indices once and scores both models on them. Replicates whose base mean is 0 are dropped (ratio
    undefined); if the base mean itself is 0 everything is nan.
    """
    base, edited = np.asarray(base, dtype=np.float64), np.asarray(edited, dtype=np.float64)
    if base.shape != edited.shape or base.ndim != 1 or base.size == 0:
        raise MemkfacError(
            f"retention needs two equal-length non-empty score vectors, got {base.shape} and {edited.shape}",
            "score the same items with both models",
        )
    if base.mean() == 0:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, base.size, size=(n_boot, base.size))  # (n_boot, n)
    b, e = base[idx].mean(axis=1), edited[idx].mean(axis=1)
    ratios = e[b > 0] / b[b > 0]
    alpha = (1 - confidence) / 2
    low, high = np.quantile(ratios, [alpha, 1 - alpha])
    return float(edited.mean() / base.mean()), float(low), float(high)


def retention(
    base: dict[str, TaskResult],
    edited: dict[str, TaskResult],
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> list[Retention]:
    """Retention per task present in both runs, items matched by document id."""
    rows = []
    for task in sorted(set(base) & set(edited)):
        b, e = base[task], edited[task]
        if not np.array_equal(b.doc_ids, e.doc_ids):
            raise MemkfacError(
                f"task {task!r} was scored on different items for base and edited model",
                "run both models with the same suite seed, item count and limit",
            )
        r, low, high = paired_bootstrap_retention(b.item_scores, e.item_scores, n_boot, seed, confidence)
        rows.append(
            Retention(
                task=task,
                base_score=b.score,
                edited_score=e.score,
                retention=r,
                ci_low=low,
                ci_high=high,
                n_items=int(b.doc_ids.size),
                n_boot=n_boot,
                confidence=confidence,
            )
        )
    return rows


def suite_name(n_items: int, seed: int) -> str:
    """The suite's name in the tables' ``probe_set`` key: ``suite-s<seed>-n<items>``."""
    return f"suite-s{seed}-n{n_items}"


def item_scores_path(variant: str, suite: str, root: Path | None = None) -> Path:
    """``MEMKFAC_HOME/downstream/<suite>/<variant>.json``: per-item scores for later retention runs."""
    root = memkfac_home() if root is None else Path(root)
    return root / "downstream" / safe_name(suite, "suite") / f"{safe_name(variant, 'variant')}.json"


def save_item_scores(results: dict[str, TaskResult], path: Path, model_dir: Path) -> Path:
    """Write per-item scores with the fingerprint of the model that produced them, atomically."""
    return write_json(
        path,
        {
            "model_dir": str(model_dir),
            "model_fingerprint": model_fingerprint(model_dir),
            "tasks": {
                t: {
                    "category": r.category,
                    "metric": r.metric,
                    "doc_ids": r.doc_ids.tolist(),
                    "item_scores": r.item_scores.tolist(),
                }
                for t, r in results.items()
            },
        },
    )


def load_item_scores(path: Path) -> dict[str, TaskResult]:
    """Read per-item scores written by ``save_item_scores``."""
    if not Path(path).is_file():
        raise MemkfacError(
            f"no downstream scores at {path}",
            "run `memkfac downstream` on the base model first, with the same suite seed and items",
        )
    fix = "delete it and score that model again with `memkfac downstream` (same seed and items)"
    tasks = read_json_object(path, fix, "downstream scores", ("tasks",))["tasks"]
    try:
        return {
            t: TaskResult(
                task=t,
                category=r["category"],
                metric=r["metric"],
                score=float(np.mean(r["item_scores"])),
                doc_ids=np.array(r["doc_ids"], dtype=np.int64),
                item_scores=np.array(r["item_scores"], dtype=np.float64),
            )
            for t, r in tasks.items()
        }
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise MemkfacError(f"downstream scores {path} are malformed ({type(e).__name__}: {e})", fix) from None


def downstream_rows(results: dict, kept: dict, seed: int) -> list[dict]:
    """Rows of the ``downstream`` table, one per task, sorted by task name.

    ``kept`` maps task -> its retention against a base model; tasks without one (the base model's own
    rows) leave the retention columns null.
    """
    rows = []
    for task, r in sorted(results.items()):
        k = kept.get(task)
        rows.append(
            {
                "task": task,
                "category": r.category,
                "metric": r.metric,
                "n_items": int(r.doc_ids.size),
                "score": r.score,
                "base_score": k.base_score if k else None,
                "retention": k.retention if k else None,
                "retention_ci_low": k.ci_low if k else None,
                "retention_ci_high": k.ci_high if k else None,
                "n_bootstrap": k.n_boot if k else None,
                "seed": seed,
            }
        )
    return rows


def evaluate_downstream(
    model_dir: Path,
    args: DownstreamArguments,
    variant: str,
    base_variant: str | None = None,
    n_boot: int = 2000,
    task_dir: Path | None = None,
    root: Path | None = None,
    progress: bool = True,
) -> pa.Table:
    """Run the suite on one model, keep its per-item scores, and write the ``downstream`` table.

    With ``base_variant``, retention against that variant's saved per-item scores (same suite) fills
    the retention columns; the base model's own rows (and tasks the base lacks) leave them null.
    Returns the table written to ``evals/downstream/variant=<variant>/probe_set=<suite>/``.
    """
    from memkfac.tables import make_table, new_run_id, write_table

    suite = suite_name(args.n_items, args.seed)
    base = load_item_scores(item_scores_path(base_variant, suite, root)) if base_variant else None
    if base is not None and (missing := [t for t in args.tasks if t in GENERATORS and t not in base]):
        raise MemkfacError(
            f"base variant {base_variant!r} has no {suite} scores for task(s) {missing}",
            "run `memkfac downstream` on the base model with these tasks first",
        )
    task_dir = task_dir if task_dir is not None else default_task_dir(args.n_items, args.seed, root)
    results = run_downstream(model_dir, args, task_dir=task_dir, progress=progress)
    save_item_scores(results, item_scores_path(variant, suite, root), Path(model_dir))
    kept = {r.task: r for r in retention(base, results, n_boot, args.seed)} if base else {}
    rows = downstream_rows(results, kept, args.seed)
    table = make_table("downstream", rows, variant=variant, probe_set=suite, run_id=new_run_id())
    write_table("downstream", table, root=root)
    return table

"""The paper's Table 1 on a memorizing model: the K-FAC edit against controls and the field's baselines.

One call does what the paper's section 5 does, on any model with a probe set whose trained probes
(kind ``memorized``) are split into ``sweep`` and ``holdout``, plus ``control`` probes:

1. K-FAC factors on the corpus's ``factor`` split, and their eigenbasis.
2. Sweep: for each candidate layer set, walk the rho grid from the gentlest edit down and stop at the
   first rho whose strict recall on the *sweep* split is <= ``max_sweep_recall``; the chosen K-FAC edit
   is the one of these with the lowest sweep perplexity (the least damaging edit that removes recall).
3. The other rows (``CompareArguments.methods``) edit the same layers, each at the strength that
   matches the K-FAC edit's sweep perplexity: by bisection on a log scale of the amount removed for the
   per-side, SVD and random-basis controls and the label-free baselines (``memkfac.label_free``:
   identity basis, flattest-block deletion, noise whose per-module norm is the K-FAC change's times
   the bisected scale); by a grid of training steps, measured in one run per learning rate (the rates
   tried in increasing order until one reaches the target), for the forget-set baselines GA+GD and NPO
   (``memkfac.forget_set``, trained on the sweep split with the corpus's finetune text as retain data).
   BalancedSubnet (supervised on the sweep split) is trained once at its configured strength. Matched
   means a perplexity increase over the base within ``match_tolerance`` of the K-FAC edit's (as a
   share of it); a row that is not, whose strength range never reaches the target, or whose training
   diverged, is kept and marked so in the report.
4. Every method is evaluated on the *holdout* split (which no method saw) and the control probes,
   held-out perplexity and nDCG@10 against the unedited model, membership inference, and the
   downstream task suite with retention and paired bootstrap confidence intervals.
5. Relearning: the K-FAC, GA+GD and NPO models are fine-tuned on the sweep split's full canaries;
   the fraction of the unedited model's holdout recall back after 10, 50 and 200 steps is a second
   table. The recall-against-perplexity figure of every row goes with the report and to MLflow.

Expensive steps are cached under ``MEMKFAC_HOME/cache`` by content: factors by (model, corpus split,
factor arguments); sweep and matching measurements by (model, eigenbasis, edit config, data); chosen
edits and the BalancedSubnet as checkpoints; downstream item scores by model weights. A rerun only
recomputes what changed. Sweep checkpoints are deleted once measured (a 135M checkpoint is 540 MB).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from memkfac.arguments import COMPARE_METHODS, RELEARNED_METHODS, CompareArguments
from memkfac.canaries import check_canary_kinds
from memkfac.champion import plot_recall_vs_perplexity
from memkfac.devices import resolve_device, resolve_dtype
from memkfac.editing import EditArguments
from memkfac.errors import MemkfacError
from memkfac.evaluate import EvalArguments, HeldOut, evaluate_model, reference_topk, write_tables
from memkfac.fingerprint import model_fingerprint, sha256_file
from memkfac.forget_set import FORGET_SET_METHODS, ForgetSetArguments, unlearn
from memkfac.generation import probes_token_ids
from memkfac.label_free import LabelFreeArguments
from memkfac.locks import DirectoryLock
from memkfac.memorization import FIELD_METRICS, memorization_rows, summarize
from memkfac.methods import EditInputs, apply_edit
from memkfac.mia import auc_rows
from memkfac.models import load_config, load_model, load_tokenizer
from memkfac.paths import atomic_file, check_output_file, memkfac_home, safe_name, write_json
from memkfac.tables import make_table, new_run_id, write_table
from memkfac.utility import perplexity

REPORT_HEADER = "<!-- memkfac compare report -->\n"  # marks the reports a later run may replace
LABELS = {
    "per_side": "per-side",
    "svd": "SVD",
    "random": "random basis",
    "balanced_subnet": "BalancedSubnet",
    "ga_gd": "GA+GD",
    "npo": "NPO",
    "identity_basis": "identity basis",
    "block_deletion": "block deletion",
    "noise": "noise",
}
# the rows the relearning table tests
RELEARNED_LABELS = {"K-FAC", *(LABELS[m] for m in RELEARNED_METHODS if m != "kfac")}
# the field's memorization metrics in memorization_summary rows, when the evaluation computes them
MIA_SCORE = "loss"  # the membership-inference row reported: the LOSS attack (Yeom et al. 2018)
# The amount each perplexity-matched method bisects over (log scale) and its range.
AMOUNT_RANGES = {
    "per_side": (1e-4, 0.99),  # 1 - rho
    "random": (1e-4, 0.99),
    "identity_basis": (1e-4, 0.99),
    "svd": (1e-4, 0.99),  # fraction of singular directions dropped
    "block_deletion": (1e-3, 1.0),  # fraction of each side's flattest eigenvectors
    "noise": (1e-2, 1e2),  # scale of the K-FAC edit's per-module change norm (1: matched norm)
}


def is_report(path: Path) -> bool:
    """Whether ``path`` is a report (Markdown, or its JSON rows) an earlier comparison wrote."""
    with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            rows = json.loads(text)
            return isinstance(rows, list) and all(isinstance(r, dict) and "variant" in r for r in rows)
        return text.startswith(REPORT_HEADER)
    return False


@dataclass
class MethodResult:
    """One row of the comparison: a method at its chosen strength, evaluated on the reported data."""

    method: str
    variant: str  # the tables' variant name
    setting: str
    model_dir: str
    sweep: dict = field(default_factory=dict)  # the sweep/matching measurement that chose it
    trained: dict = field(default_factory=dict)  # memorization summary on the holdout split
    seen: dict = field(default_factory=dict)  # on the sweep split (what the forget-set methods trained on)
    control: dict = field(default_factory=dict)
    perplexity: float = math.nan
    ndcg: float = math.nan
    downstream: dict = field(default_factory=dict)  # pooled retention and per-task rows
    mia: dict = field(default_factory=dict)  # auc and (when computed) tpr_at_1pct_fpr, holdout vs control
    note: str = ""  # why the row is not what was asked: unmatched perplexity, divergence
    relearning: dict = field(default_factory=dict)  # before_edit, at_0 and recovered by steps


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _pooled(rows: list[dict]) -> dict:
    """Table-1 aggregate over rows regardless of split (n, strict %, loose %, avg_lev), and the field's
    metrics (``FIELD_METRICS``) where ``summarize`` gives them."""
    if not rows:
        return {}
    (summary,) = summarize([r | {"split": "all"} for r in rows])
    return {k: summary[k] for k in ("n_probes", "strict_pct", "loose_pct", "avg_lev")} | {
        k: summary[k] for k in FIELD_METRICS if k in summary
    }


def _mia(rows: list[dict]) -> dict:
    """The ``MIA_SCORE`` attack's AUC (and TPR at 1% FPR where computed): held-out members vs controls."""
    held = [r for r in rows if r["kind"] == "control" or r["split"] == "holdout"]
    found = [r for r in auc_rows(held) if r["score"] == MIA_SCORE]
    return {k: found[0].get(k) for k in ("auc", "tpr_at_1pct_fpr")} if found else {}


class Comparison:
    """State of one comparison run: inputs, the cache directory and the measurement helpers."""

    def __init__(
        self,
        model_dir: Path,
        probes,
        corpus_dir: Path,
        args: CompareArguments,
        progress: bool,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
    ):
        self.device, self.dtype = resolve_device(device), dtype
        resolve_dtype(dtype, self.device)
        args.check()
        self.model_dir, self.corpus_dir = Path(model_dir), Path(corpus_dir)
        self.args, self.progress = args, progress
        check_canary_kinds(probes, "the probe set")
        self.sweep_probes = [p for p in probes if p.kind == "memorized" and p.split == "sweep"]
        holdout = [p for p in probes if p.kind == "memorized" and p.split == "holdout"]
        if not self.sweep_probes or not holdout:
            raise MemkfacError(
                f"the probe set has {len(self.sweep_probes)} sweep and {len(holdout)} holdout trained probes",
                "mark the trained probes kind memorized and split them between sweep and holdout",
            )
        # every probe is checked against the model's vocabulary before anything is computed
        ids = probes_token_ids(probes, load_tokenizer(self.model_dir), load_config(self.model_dir).vocab_size)
        self.probes = probes
        self.forget_pairs = [
            (prompt, gold)
            for p, (prompt, gold) in zip(probes, ids, strict=True)
            if p.kind == "memorized" and p.split == "sweep"
        ]
        self.forget = [prompt + gold for prompt, gold in self.forget_pairs]
        self.base_fp = model_fingerprint(self.model_dir)
        self.cache = memkfac_home() / "cache"
        # choices are made on the last sweep_blocks held-out blocks, results reported on the first ones
        split = HeldOut.from_corpus(self.corpus_dir)
        n = len(split.blocks)
        if n < 2 * args.sweep_blocks:
            raise MemkfacError(
                f"the held-out split of {corpus_dir} has {n} blocks; the sweep needs {args.sweep_blocks} "
                "and the report at least as many others",
                "build the corpus with more held-out text or lower --sweep-blocks",
            )
        report_n = min(args.eval_blocks or n, n - args.sweep_blocks)
        self.heldout = HeldOut(split.blocks[:report_n], split.name, split.fingerprint)
        self.sweep_heldout = HeldOut(split.blocks[-args.sweep_blocks :], split.name, split.fingerprint)
        self.probe_fp = _key([(p.id, p.prefix, p.suffix, p.prefix_ids, p.suffix_ids) for p in probes])
        self.eig_dir: Path | None = None
        self._retain: torch.Tensor | None = None

    def retain(self) -> torch.Tensor:
        """(n, block_len) the retain set of the forget-set methods: the first finetune-split blocks."""
        from memkfac.corpora import load_split

        if self._retain is None:
            self._retain = load_split(self.corpus_dir, "finetune")[: self.args.retain_blocks]
        return self._retain

    def retain_fingerprint(self) -> str:
        from memkfac.corpora import corpus_fingerprint

        return _key(corpus_fingerprint(self.corpus_dir, "finetune"), self.args.retain_blocks)

    # -- factors and eigenbasis --------------------------------------------------------------------
    def eigenbasis(self) -> Path:
        from memkfac.corpora import corpus_fingerprint, load_split
        from memkfac.eigen import EIGEN_SUBDIR, compute_eigenbasis, eigenbasis_is_current
        from memkfac.factors import FactorArguments, collect_factors

        a = self.args
        layers = sorted(set(a.factor_layers or [i for s in a.layer_sets for i in s]))
        fargs = FactorArguments(
            layers=layers,
            projections=a.projections,
            batch_size=a.factor_batch_size,
            model_dtype=self.dtype,
            max_tokens=a.factor_tokens,
            seed=a.seed,
        )
        corpus_fp = corpus_fingerprint(self.corpus_dir, "factor")
        # How the collection is cut into shards changes only the order of a float sum, not what is
        # estimated, so the key leaves shard_tokens out (its default depends on the model's size).
        key_args = {k: v for k, v in fargs.to_json().items() if k != "shard_tokens"}
        factor_dir = self.cache / "factors" / _key(self.base_fp, corpus_fp, key_args)
        eig_dir = factor_dir / EIGEN_SUBDIR
        if not eigenbasis_is_current(eig_dir, factor_dir):
            model, _ = self.load(self.model_dir)
            collect_factors(
                model,
                load_split(self.corpus_dir, "factor"),
                factor_dir,
                fargs,
                model_fingerprint=self.base_fp,
                corpus_fingerprint=corpus_fp,
                progress=self.progress,
            )
            del model
            compute_eigenbasis(
                factor_dir, eig_dir, progress=self.progress, overwrite=True, device=self.device
            )
        self.eig_dir = eig_dir
        return eig_dir

    def load(self, model_dir: Path):
        """``(model, tokenizer)`` on the comparison's device, in its dtype."""
        return load_model(model_dir, dtype=self.dtype, device=self.device)

    # -- edits and measurements --------------------------------------------------------------------
    def _edit_key(self, config) -> str:
        """The cache key of an edit: the model, the eigenbasis, the arguments (and the training data of
        a forget-set method)."""
        trained = config.method in FORGET_SET_METHODS
        uses_eigen = config.method not in ("svd", "noise") and not trained
        eig = sha256_file(self.eig_dir / "meta.json") if uses_eigen else None
        data = (self.forget, self.retain_fingerprint()) if trained else None
        return _key(self.base_fp, eig, asdict(config), data)

    def edit(self, config) -> Path:
        """The edited checkpoint for ``config`` (any ``memkfac.methods`` arguments), cached or written now."""
        out = self.cache / "edits" / self._edit_key(config)
        if not (out / "memkfac_manifest.json").is_file():
            inputs = EditInputs(
                self.model_dir,
                self.eig_dir,
                self.probes,
                self.retain() if config.method in FORGET_SET_METHODS else None,
            )
            apply_edit(config, inputs, out, progress=False, device=self.device)
        return out

    def sweep_point(self, config, with_recall: bool) -> dict:
        """Sweep perplexity (and strict recall on the sweep split) of an edit; cached as JSON."""
        key = _key(
            self._edit_key(config),
            self.probe_fp,
            self.sweep_heldout.fingerprint,
            len(self.sweep_heldout.blocks),
            with_recall,
        )
        path = self.cache / "compare" / "points" / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        was_cached = (self.cache / "edits" / self._edit_key(config)).exists()
        edit_dir = self.edit(config)
        model, tokenizer = self.load(edit_dir)
        point = {"ppl": perplexity(model, self.sweep_heldout.blocks, progress=False)["perplexity"]}
        if with_recall:
            point |= _pooled(
                memorization_rows(
                    model,
                    tokenizer,
                    self.sweep_probes,
                    self.args.batch_size,
                    progress=False,
                    teacher_forced=False,
                )
            )
        if not was_cached:
            shutil.rmtree(edit_dir)  # measured; re-created (bit-identically) only if chosen
        write_json(path, point)
        return point

    def base_sweep_ppl(self) -> float:
        model, _ = self.load(self.model_dir)
        return perplexity(model, self.sweep_heldout.blocks, progress=False)["perplexity"]

    # -- the K-FAC sweep ---------------------------------------------------------------------------
    def sweep(self, log) -> tuple[EditArguments, dict, list[dict]]:
        a = self.args
        points = []
        for layers in a.layer_sets:
            for rho in sorted(a.rhos, reverse=True):
                config = EditArguments(
                    layers=list(layers), projections=a.projections, keep_mass=rho, seed=a.seed
                )
                point = self.sweep_point(config, with_recall=True) | {"layers": list(layers), "rho": rho}
                points.append(point)
                log(
                    f"  kfac layers {_span(layers)} rho {rho}: sweep strict {point['strict_pct']:.1f}% "
                    f"loose {point['loose_pct']:.1f}% ppl {point['ppl']:.3f}"
                )
                if point["strict_pct"] <= a.max_sweep_recall:
                    break  # smaller rho removes more and costs more perplexity
        removed = [p for p in points if p["strict_pct"] <= a.max_sweep_recall]
        best = min(
            removed or points,
            key=lambda p: (p["ppl"], p["strict_pct"]) if removed else (p["strict_pct"], p["ppl"]),
        )
        config = EditArguments(
            layers=best["layers"], projections=a.projections, keep_mass=best["rho"], seed=a.seed
        )
        return config, best | {"recall_removed": bool(removed)}, points

    # -- rows at matched perplexity ------------------------------------------------------------------
    def matched(self, method: str, config_for, target_ppl: float, log) -> tuple[object, dict, bool]:
        """Bisection on log(amount) over ``AMOUNT_RANGES[method]`` so that the sweep perplexity of
        ``config_for(amount)`` matches ``target_ppl``: ``(config, point)`` of the closest point measured,
        and whether the points measured bracket the target."""
        lo, hi = (math.log(x) for x in AMOUNT_RANGES[method])
        points = []
        for _ in range(self.args.match_steps):
            amount = math.exp((lo + hi) / 2)
            point = self.sweep_point(config_for(amount), with_recall=False) | {"amount": amount}
            points.append(point)
            log(f"  {method} amount {amount:.4g}: sweep ppl {point['ppl']:.3f} (target {target_ppl:.3f})")
            if point["ppl"] < target_ppl:
                lo = math.log(amount)
            else:
                hi = math.log(amount)
        point = _closest(points, target_ppl)
        return config_for(point["amount"]), point, _brackets(points, target_ppl)

    def forget_set_grid(self, method: str, layers: list[int], target_ppl: float, log) -> tuple:
        """GA+GD or NPO toward ``target_ppl``: one run per rate of ``forget_lrs`` (increasing), each
        trained up to max(``forget_steps``) steps with the sweep perplexity measured at each grid step,
        stopping at the first that reaches the target; no higher rate is tried once one has. A run that
        reaches it is refined: rerun to that step, measured at ``match_steps`` evenly spaced steps since
        the grid step before (batches depend only on the seed and the step, so the models agree).
        ``(config of the closest point or None, that point, bracketed, divergence notes)``."""
        a = self.args
        points, diverged = [], []
        for lr in sorted(a.forget_lrs):
            top = ForgetSetArguments(
                layers=list(layers),
                projections=a.projections,
                method=method,
                steps=max(a.forget_steps),
                lr=lr,
                beta=a.npo_beta,
                seed=a.seed,
            )
            run = self._forget_set_run(top, a.forget_steps, target_ppl, log)
            if run["diverged_at"] is not None:
                diverged.append(f"diverged at step {run['diverged_at']} (lr {lr:g})")
            reached = [p["steps"] for p in run["points"] if p["ppl"] >= target_ppl]
            if reached:
                below = max((p["steps"] for p in run["points"] if p["ppl"] < target_ppl), default=0)
                finer = _steps_between(below, reached[0], a.match_steps)
                if finer:
                    refined = dataclasses.replace(top, steps=reached[0])
                    run["points"] += self._forget_set_run(refined, finer, target_ppl, log)["points"]
            points += [p | {"lr": lr} for p in run["points"]]
            if reached:
                break
        if not points:
            return None, {}, False, diverged
        point = _closest(points, target_ppl)
        config = dataclasses.replace(top, steps=point["steps"], lr=point["lr"])
        return config, point, _brackets(points, target_ppl), diverged

    def _forget_set_run(self, top: ForgetSetArguments, grid, target_ppl: float, log) -> dict:
        """``{"points": [{"steps", "ppl"}], "diverged_at"}`` of one training run to ``top.steps``, its
        sweep perplexity measured at the ``grid`` steps until one reaches ``target_ppl`` (cached)."""
        key = _key(
            self._edit_key(top),
            grid,
            round(target_ppl, 6),  # where the run stops
            self.sweep_heldout.fingerprint,
            len(self.sweep_heldout.blocks),
        )
        path = self.cache / "compare" / "grids" / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        model, tokenizer = self.load(self.model_dir)
        points = []

        def measure(step: int) -> bool:
            if step not in grid:
                return False
            ppl = perplexity(model, self.sweep_heldout.blocks, progress=False)["perplexity"]
            points.append({"steps": step, "ppl": ppl})
            log(f"  {top.method} lr {top.lr:g} {step} steps: sweep ppl {ppl:.3f} (target {target_ppl:.3f})")
            return bool(ppl >= target_ppl)  # past the target: later steps are not needed

        result = unlearn(
            model, self.forget_pairs, self.retain().tolist(), top, tokenizer.pad_token_id or 0, False, measure
        )
        run = {"points": points, "diverged_at": result.diverged_at}
        write_json(path, run)
        return run

    def relearning(self, model_dir: Path) -> dict:
        """Holdout strict recall before the edit, after it, and the fraction of the former back after each
        of ``relearn_steps`` steps of relearning on the sweep split; cached by weights and settings."""
        a = self.args
        key = _key(model_fingerprint(model_dir), self.base_fp, self.probe_fp, a.relearn_steps, a.seed)
        path = self.cache / "compare" / "relearning" / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        rows = _relearn_rows(
            model_dir, self.model_dir, self.probes, self.retain(), a, self.progress, self.device
        )
        measured = [r for r in rows if r["kind"] == "memorized"]
        at_zero = next(r for r in measured if r["steps"] == 0)
        out = {
            "before_edit": at_zero["strict_pct_before_edit"],
            "at_0": at_zero["strict_pct"],
            "recovered": {str(r["steps"]): r["recovered"] for r in measured if r["steps"] > 0},
        }
        write_json(path, out)
        return out

    def balanced_subnet(self, layers: list[int]) -> tuple[Path, dict]:
        from memkfac.balanced_subnet import BSNArguments, train_balanced_subnet
        from memkfac.corpora import corpus_fingerprint, load_split

        a = self.args
        bsn_args = BSNArguments(layers=list(layers), projections=a.projections, seed=a.seed)
        if a.bsn_ratio is not None:
            bsn_args.ratio = a.bsn_ratio
        if a.bsn_epochs is not None:
            bsn_args.epochs = a.bsn_epochs
        forget = self.forget
        retain = load_split(self.corpus_dir, "finetune")[: a.retain_blocks].tolist()
        key = _key(
            self.base_fp,
            asdict(bsn_args),
            forget,
            corpus_fingerprint(self.corpus_dir, "finetune"),
            a.retain_blocks,
        )
        out = self.cache / "bsn" / key
        if not (out / "memkfac_manifest.json").is_file():
            train_balanced_subnet(
                self.model_dir, forget, retain, bsn_args, out, progress=self.progress, device=self.device
            )
        return out, asdict(bsn_args)

    # -- reported evaluation -------------------------------------------------------------------------
    def downstream_scores(self, model_dir: Path) -> dict:
        """Per-task item scores of ``model_dir`` on the suite, cached by weights and suite."""
        from memkfac.downstream import DownstreamArguments, load_item_scores, run_downstream, save_item_scores

        dargs = DownstreamArguments(
            n_items=self.args.downstream_items, seed=self.args.seed, device=str(self.device), dtype=self.dtype
        )
        if self.args.downstream_tasks:
            dargs.tasks = tuple(self.args.downstream_tasks)
        key = _key(model_fingerprint(model_dir), asdict(dargs))
        path = self.cache / "compare" / "downstream" / f"{key}.json"
        if not path.is_file():
            save_item_scores(run_downstream(model_dir, dargs, progress=self.progress), path, model_dir)
        return load_item_scores(path)


def _relearn_rows(
    model_dir: Path,
    reference_dir: Path,
    probes,
    blocks: torch.Tensor,
    args: CompareArguments,
    progress,
    device,
) -> list[dict]:
    """The ``relearn`` arm of the attack suite (fine-tuning on the sweep split's full canaries) on
    ``model_dir``: ``resurgence`` rows, the holdout recall after each of ``args.relearn_steps``.
    The one place the comparison calls that suite."""
    from memkfac.resurgence import ResurgenceArguments, attack_rows

    arguments = ResurgenceArguments(steps=tuple(args.relearn_steps), arms=("relearn",), seed=args.seed)
    return attack_rows(model_dir, reference_dir, probes, blocks, arguments, progress, device)


def _span(layers) -> str:
    layers = sorted(layers)
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}-{layers[-1]}" if contiguous and len(layers) > 1 else ",".join(map(str, layers))


def _setting(config, amount: float | None = None) -> str:
    """What a row ran, in words: where, and its strength (``amount``: the noise's scale)."""
    where = f"layers {_span(config.layers)} {'+'.join(config.projections)}"
    if config.method == "svd":
        return f"{where}, drop {config.svd_drop:.4g} of singular directions"
    if config.method == "identity_basis":
        return f"{where}, identity basis rho {config.keep_mass:.6g}"
    if config.method == "block_deletion":
        return f"{where}, delete the flattest {config.block_fraction:.4g} of each side"
    if config.method == "noise":
        return f"{where}, noise of {amount:.4g} x the K-FAC change norm"
    if config.method in FORGET_SET_METHODS:
        beta = f" beta {config.beta:g}" if config.method == "npo" else ""
        return f"{where}, {config.steps} steps lr {config.lr:g}{beta}"
    return f"{where}, rho {config.keep_mass:.6g}"


def _closest(points: list[dict], target_ppl: float) -> dict:
    return min(points, key=lambda p: abs(math.log(p["ppl"] / target_ppl)))


def _steps_between(lo: int, hi: int, n: int) -> tuple[int, ...]:
    """Up to ``n`` evenly spaced whole steps strictly between ``lo`` and ``hi``."""
    return tuple(sorted({round(lo + (hi - lo) * i / (n + 1)) for i in range(1, n + 1)} - {lo, hi}))


def _brackets(points: list[dict], target_ppl: float) -> bool:
    """Whether the perplexities measured lie on both sides of the target (or on it)."""
    return min(p["ppl"] for p in points) <= target_ppl <= max(p["ppl"] for p in points)


def cost_share(ppl: float, target_ppl: float, base_ppl: float) -> float:
    """A row's sweep-perplexity increase over the base as a share of the K-FAC edit's (1: matched).
    An edit that costs less than 0.5% of the base's perplexity counts as costing 0.5%, so a free
    K-FAC edit does not make every row unmatched by a rounding error."""
    return (ppl - base_ppl) / max(target_ppl - base_ppl, 0.005 * base_ppl)


def matching_note(ppl: float, target_ppl: float, base_ppl: float, tolerance: float, bracketed: bool) -> str:
    """The report's mark on a row whose perplexity increase is not within ``tolerance`` of the K-FAC
    edit's: "" when matched; else what the closest point cost, and whether the strength range ever got
    past the target."""
    share = cost_share(ppl, target_ppl, base_ppl)
    if abs(share - 1) <= tolerance:
        return ""
    if not bracketed:
        side = "below" if ppl < target_ppl else "above"
        return (
            f"did not reach target perplexity: every strength tried stays {side} it; the closest costs "
            f"{share:.0%} of the K-FAC edit's perplexity increase"
        )
    return f"not matched: the closest point costs {share:.0%} of the K-FAC edit's perplexity increase"


def _matched_configs(c: Comparison, method: str, kfac: EditArguments, kfac_dir: Path):
    """``config_for(amount)`` of a perplexity-matched row on the K-FAC edit's layers."""
    from memkfac.checkpoint import load_manifest

    where = {"layers": kfac.layers, "projections": kfac.projections, "seed": c.args.seed}
    if method == "svd":
        return lambda x: EditArguments(**where, method="svd", svd_drop=x)
    if method in ("per_side", "random"):
        return lambda x: EditArguments(**where, method=method, keep_mass=1 - x)
    if method == "identity_basis":
        return lambda x: LabelFreeArguments(**where, method=method, keep_mass=1 - x)
    if method == "block_deletion":
        return lambda x: LabelFreeArguments(**where, method=method, block_fraction=x)
    change = {f"{m['layer']}.{m['proj']}": m["rel_change"] for m in load_manifest(kfac_dir)["modules"]}
    return lambda x: LabelFreeArguments(
        **where, method="noise", overrides={k: round(x * v, 12) for k, v in change.items()}
    )


def run_comparison(
    model_dir: Path,
    probes,
    corpus_dir: Path,
    args: CompareArguments | None = None,
    probe_set: str = "canaries",
    report_path: Path | None = None,
    progress: bool = True,
    log=print,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
) -> list[MethodResult]:
    """Run the whole comparison; write its tables and a Markdown report; return one row per method.

    Every model (factors, sweep, controls, BalancedSubnet, evaluations, downstream) runs on ``device``
    in ``dtype``; both are checked before anything runs.

    Tables go to MEMKFAC_HOME/evals (memorization, memorization_summary, mia, mia_auc, perplexity,
    ndcg and downstream per variant; ``comparison`` for the rows); the Markdown report to
    ``report_path`` (default MEMKFAC_HOME/reports/comparison-<probe_set>.md, its rows as ``.json`` and
    the recall-vs-perplexity figure as ``.png`` beside it), which may replace an earlier report but no
    other file unless ``overwrite``; the run is logged to MLflow unless ``args.mlflow`` is False. The
    cache is locked for the whole run: a second comparison in the same MEMKFAC_HOME is refused at once.
    """
    args = args or CompareArguments()
    probe_set = safe_name(probe_set, "probe set name")
    report_path = (
        Path(report_path) if report_path else memkfac_home() / "reports" / f"comparison-{probe_set}.md"
    )
    c = Comparison(model_dir, probes, corpus_dir, args, progress, device, dtype)
    for path in (report_path, report_path.with_suffix(".json")):
        check_output_file(path, overwrite=overwrite, inputs=[model_dir, corpus_dir], owns=is_report)
    # the figure beside an earlier report is that report's
    figure = report_path.with_suffix(".png")
    check_output_file(
        figure, overwrite=overwrite, inputs=[model_dir, corpus_dir], owns=lambda _: is_report(report_path)
    )
    with DirectoryLock(c.cache):  # one comparison writes the cache at a time
        return _run(c, probes, args, probe_set, report_path, progress, log)


def _run(
    c: Comparison, probes, args: CompareArguments, probe_set: str, report_path: Path, progress: bool, log
) -> list[MethodResult]:
    """The comparison's steps, holding the cache lock."""
    log("K-FAC factors and eigenbasis")
    c.eigenbasis()
    log(f"sweep: recall on {len(c.sweep_probes)} probes, perplexity on {len(c.sweep_heldout.blocks)} blocks")
    kfac, kfac_point, _ = c.sweep(log)
    if not kfac_point["recall_removed"]:
        log(f"warning: no swept edit brought sweep recall to <= {args.max_sweep_recall}%; using the lowest")
    target = kfac_point["ppl"]

    kfac_dir = c.edit(kfac)
    span = _span(kfac.layers)
    base_ppl = c.base_sweep_ppl()
    chosen: list[tuple[str, str, Path | None, str, dict, str]] = [
        ("base", "base", c.model_dir, "unedited", {"ppl": base_ppl}, ""),
        ("K-FAC", f"kfac-l{span}-r{kfac.keep_mass}", kfac_dir, _setting(kfac), kfac_point, ""),
    ]
    for method in (m for m in COMPARE_METHODS if m in args.methods):
        label = LABELS[method]
        if method in AMOUNT_RANGES:
            log(f"{label} at matched sweep perplexity {target:.3f}")
            config, point, bracketed = c.matched(
                method, _matched_configs(c, method, kfac, kfac_dir), target, log
            )
            note = matching_note(point["ppl"], target, base_ppl, args.match_tolerance, bracketed)
            variant = f"{method}-l{span}-x{point['amount']:.4g}"
            chosen.append((label, variant, c.edit(config), _setting(config, point["amount"]), point, note))
        elif method in FORGET_SET_METHODS:
            grid, lrs = list(args.forget_steps), sorted(args.forget_lrs)
            log(f"{label} on the sweep split, steps {grid} at lr {lrs} toward sweep perplexity {target:.3f}")
            config, point, bracketed, notes = c.forget_set_grid(method, kfac.layers, target, log)
            if config is None:
                chosen.append(
                    (label, f"{method}-l{span}", None, "no grid step before divergence", {}, "; ".join(notes))
                )
                continue
            notes.append(matching_note(point["ppl"], target, base_ppl, args.match_tolerance, bracketed))
            variant = f"{method}-l{span}-s{config.steps}-lr{config.lr:g}"
            chosen.append(
                (label, variant, c.edit(config), _setting(config), point, "; ".join(filter(None, notes)))
            )
        else:
            log("BalancedSubnet on the sweep split")
            bsn_dir, bsn_args = c.balanced_subnet(kfac.layers)
            setting = f"layers {span} {'+'.join(args.projections)}, ratio {bsn_args['ratio']}"
            chosen.append((label, f"bsn-l{span}-p{bsn_args['ratio']}", bsn_dir, setting, {}, ""))

    run_id = new_run_id()
    reference = reference_topk(c.model_dir, c.heldout, progress=progress, device=c.device, dtype=c.dtype)
    results = []
    base_downstream = None
    for method, variant, model_dir_i, setting, point, note in chosen:
        variant = safe_name(variant, "variant")
        if model_dir_i is None:  # nothing to evaluate: the row stays, marked
            results.append(MethodResult(method, variant, setting, "", point, note=note))
            continue
        log(f"evaluating {method} ({variant})")
        model, tokenizer = c.load(model_dir_i)
        tables = evaluate_model(
            model,
            tokenizer,
            probes,
            variant=variant,
            probe_set=probe_set,
            args=EvalArguments(batch_size=args.batch_size),
            heldout=c.heldout,
            reference=reference,
            run_id=run_id,
            progress=progress,
        )
        del model
        rows = tables["memorization"].to_pylist()
        result = MethodResult(
            method=method,
            variant=variant,
            setting=setting,
            model_dir=str(model_dir_i),
            sweep=point,
            trained=_pooled([r for r in rows if r["kind"] == "memorized" and r["split"] == "holdout"]),
            seen=_pooled([r for r in rows if r["kind"] == "memorized" and r["split"] == "sweep"]),
            control=_pooled([r for r in rows if r["kind"] == "control"]),
            perplexity=tables["perplexity"].column("perplexity")[0].as_py(),
            ndcg=tables["ndcg"].column("ndcg")[0].as_py(),
            mia=_mia(tables["mia"].to_pylist()) if "mia" in tables else {},
            note=note,
        )
        if args.downstream:
            from memkfac.downstream import suite_name

            scores = c.downstream_scores(Path(model_dir_i))
            base_downstream = scores if method == "base" else base_downstream
            result.downstream = _downstream(scores, base_downstream, args.seed)
            tables["downstream"] = make_table(
                "downstream",
                result.downstream["tasks"],
                variant=variant,
                probe_set=suite_name(args.downstream_items, args.seed),  # as `memkfac downstream` names it
                run_id=run_id,
            )
        write_tables(tables)
        results.append(result)

    if args.relearn:
        for r in results:
            if r.model_dir and r.method in RELEARNED_LABELS:
                log(f"relearning {r.method} on the sweep split ({list(args.relearn_steps)} steps)")
                r.relearning = c.relearning(Path(r.model_dir))
    figure = plot_recall_vs_perplexity(
        [(r.method, r.perplexity, r.trained["strict_pct"]) for r in results if r.trained],
        report_path.with_suffix(".png"),
        f"recall against perplexity ({probe_set})",
    )
    write_table(
        "comparison",
        make_table(
            "comparison",
            [_comparison_row(r) for r in results],
            variant="all",
            probe_set=probe_set,
            run_id=run_id,
        ),
    )
    report = format_report(results, args, kfac_point)
    with atomic_file(report_path) as tmp:
        tmp.write_text(REPORT_HEADER + report)
    write_json(report_path.with_suffix(".json"), [asdict(r) for r in results])
    if args.mlflow:
        _log_to_mlflow(results, report_path, figure, probe_set, log)
    log(report)
    log(f"wrote {report_path} and {figure.name}")
    return results


def _log_to_mlflow(results: list[MethodResult], report_path: Path, figure: Path, probe_set: str, log) -> None:
    """The comparison as one MLflow run (per-row metrics, report, rows, figure) in the pipeline's store:
    ``MLFLOW_TRACKING_URI``, else the sqlite file under MEMKFAC_HOME/mlflow, experiment ``memkfac``.
    A failure is logged, not raised: the report is already written."""
    import os

    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        log("mlflow is not installed: the comparison is not logged to MLflow")
        return
    home = memkfac_home()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    try:
        (home / "mlflow").mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.get_experiment_by_name("memkfac")
        experiment_id = (
            experiment.experiment_id
            if experiment
            else client.create_experiment(
                "memkfac", artifact_location=(home / "mlflow" / "artifacts").as_uri()
            )
        )
        run = client.create_run(experiment_id, run_name=f"compare {probe_set}", tags={"kind": "comparison"})
        for r in results:
            name = safe_name(r.method.replace("+", "_").replace(" ", "_"), "method")
            row = _comparison_row(r)
            for key, value in row.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                    client.log_metric(run.info.run_id, f"{name}.{key}", float(value))
        for path in (report_path, report_path.with_suffix(".json"), figure):
            client.log_artifact(run.info.run_id, str(path), "comparison")
        client.set_terminated(run.info.run_id)
        log(f"logged to MLflow run {run.info.run_id} ({uri})")
    except Exception as e:  # noqa: BLE001 - the tracking store's failures are many; the report stands
        log(f"warning: could not log the comparison to MLflow ({uri}): {e}")


def _downstream(scores: dict, base: dict, seed: int) -> dict:
    """Per-task ``downstream`` rows and the pooled retention (all items of all tasks) with its CI.

    The base model's own rows leave the retention columns null, as ``memkfac downstream`` does.
    """
    from memkfac.downstream import downstream_rows, paired_bootstrap_retention, retention

    kept = {} if scores is base else {r.task: r for r in retention(base, scores, seed=seed)}
    tasks = downstream_rows(scores, kept, seed)
    if not kept:
        return {"tasks": tasks, "retention": None, "ci_low": None, "ci_high": None}
    common = sorted(kept)
    pooled = paired_bootstrap_retention(
        np.concatenate([base[t].item_scores for t in common]),
        np.concatenate([scores[t].item_scores for t in common]),
        seed=seed,
    )
    return {"tasks": tasks, "retention": pooled[0], "ci_low": pooled[1], "ci_high": pooled[2]}


def _comparison_row(r: MethodResult) -> dict:
    d = r.downstream
    return {
        "method": r.method,
        "setting": r.setting,
        "trained_strict_pct": r.trained.get("strict_pct"),
        "trained_loose_pct": r.trained.get("loose_pct"),
        "trained_avg_lev": r.trained.get("avg_lev"),
        **{f"trained_{k}": r.trained.get(k) for k in FIELD_METRICS},
        "sweep_strict_pct": r.seen.get("strict_pct"),
        "sweep_ppl": r.sweep.get("ppl"),
        "control_strict_pct": r.control.get("strict_pct"),
        "control_loose_pct": r.control.get("loose_pct"),
        "control_avg_lev": r.control.get("avg_lev"),
        "perplexity": r.perplexity,
        "ndcg": r.ndcg,
        "downstream_retention": d.get("retention"),
        "downstream_ci_low": d.get("ci_low"),
        "downstream_ci_high": d.get("ci_high"),
        "mia_auc": r.mia.get("auc"),
        "mia_tpr_at_1pct_fpr": r.mia.get("tpr_at_1pct_fpr"),
        "note": r.note,
    }


def _cell(value, spec: str = ".3f") -> str:
    """A number formatted for the report, or "–" when it was not computed."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_report(results: list[MethodResult], args: CompareArguments, kfac_point: dict) -> str:
    """The comparison as Markdown: every row and column, the relearning table, downstream per task."""
    t0 = results[0]
    lines = [
        "| method | setting | strict % | loose % | avgLev | VerbMem | exact mem. | extraction str. "
        "| control strict % | MIA AUC | TPR@1%FPR | perplexity | nDCG@10 | downstream retention [95% CI] "
        "| sweep strict % | sweep perplexity | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d, t = r.downstream, r.trained
        ds = (
            f"{d['retention']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"
            if d.get("retention") is not None
            else "–"
        )
        lines.append(
            f"| {r.method} | {r.setting} | {_cell(t.get('strict_pct'), '.1f')} "
            f"| {_cell(t.get('loose_pct'), '.1f')} "
            f"| {_cell(t.get('avg_lev'))} | {_cell(t.get('verbmem'))} | {_cell(t.get('exact_memorization'))} "
            f"| {_cell(t.get('extraction_strength'))} | {_cell(r.control.get('strict_pct'), '.1f')} "
            f"| {_cell(r.mia.get('auc'))} | {_cell(r.mia.get('tpr_at_1pct_fpr'))} | {_cell(r.perplexity)} "
            f"| {_cell(r.ndcg)} | {ds} | {_cell(r.seen.get('strict_pct'), '.1f')} "
            f"| {_cell(r.sweep.get('ppl'))} | {r.note or ''} |"
        )
    lines += [
        "",
        f"Trained: the {t0.trained['n_probes']} holdout-split trained probes, which no method saw. "
        f"Control: {t0.control.get('n_probes', 0)} never-trained probes. VerbMem: ROUGE-L F1 of the greedy "
        "continuation against the true suffix (MUSE); exact mem.: teacher-forced argmax accuracy on the "
        "suffix; extraction str.: extraction strength; all means in [0, 1]; – where not computed. "
        f"MIA: the {MIA_SCORE.upper()} attack, held-out trained probes against the controls (AUC, and TPR at "
        "1% FPR). Sweep strict %: recall of the sweep-split probes, which GA+GD, NPO and BalancedSubnet "
        "trained to forget and on which the K-FAC edit's rho was chosen.",
        (
            f"K-FAC layers and rho were chosen on the sweep split: strict recall <= {args.max_sweep_recall}% "
            "there at the lowest perplexity"
            if kfac_point["recall_removed"]
            else f"No swept K-FAC edit brought sweep recall to <= {args.max_sweep_recall}%; the row is the "
            "lowest-recall edit"
        )
        + f" (sweep strict {kfac_point['strict_pct']:.1f}%, sweep perplexity {kfac_point['ppl']:.3f}).",
        "Every other row edits the same layers at the strength matching that sweep perplexity: bisection "
        "for per-side, SVD, random basis, identity basis, block deletion and noise (noise: each module's "
        "norm is the K-FAC change's there, times the scale shown); the closest step of the "
        f"{list(args.forget_steps)} grid for GA+GD and NPO (trained on the sweep split, retain: the "
        f"finetune split), at the first rate of {sorted(args.forget_lrs)} whose run reaches the target. "
        "A row whose sweep-perplexity increase over the base is not within "
        f"{args.match_tolerance:.0%} of the K-FAC edit's is marked. BalancedSubnet was trained once at "
        "its configured strength (not matched).",
        "Perplexity: exp(mean token NLL) on held-out blocks. "
        "nDCG@10: paper formula, against the unedited model.",
    ]
    relearned = [r for r in results if r.relearning]
    if relearned:
        steps = list(args.relearn_steps)
        lines += [
            "",
            "Relearning: fraction of the unedited model's holdout strict recall back after N steps of "
            "fine-tuning on the sweep split's canaries (disjoint from the holdout).",
            "",
            "| method | holdout strict % before edit | after edit | "
            + " | ".join(f"{n} steps" for n in steps)
            + " |",
            "|---|---|---|" + "---|" * len(steps),
        ]
        for r in relearned:
            rl = r.relearning
            cells = [_cell(rl["recovered"].get(str(n), rl["recovered"].get(n)), ".2f") for n in steps]
            lines.append(
                f"| {r.method} | {_cell(rl['before_edit'], '.1f')} | {_cell(rl['at_0'], '.1f')} | "
                + " | ".join(cells)
                + " |"
            )
    tasks = [t["task"] for t in t0.downstream.get("tasks", [])]
    if tasks:
        lines += ["", "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        base_scores = {t["task"]: t["score"] for t in t0.downstream["tasks"]}
        lines.append("| base (accuracy) | " + " | ".join(f"{base_scores[t]:.3f}" for t in tasks) + " |")
        for r in results[1:]:
            if not r.downstream:
                continue
            by_task = {t["task"]: t for t in r.downstream["tasks"]}
            cells = [
                f"{by_task[t]['retention']:.2f} [{by_task[t]['retention_ci_low']:.2f}, "
                f"{by_task[t]['retention_ci_high']:.2f}]"
                for t in tasks
            ]
            lines.append(f"| {r.method} (retention) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

"""The paper's Table 1 on a memorizing model: K-FAC edit vs controls vs BalancedSubnet.

One call does what the paper's section 5 does, on any model with a probe set whose trained probes
(kind ``memorized``) are split into ``sweep`` and ``holdout``, plus ``control`` probes:

1. K-FAC factors on the corpus's ``factor`` split, and their eigenbasis.
2. Sweep: for each candidate layer set, walk the rho grid from the gentlest edit down and stop at the
   first rho whose strict recall on the *sweep* split is <= ``max_sweep_recall``; the chosen K-FAC edit
   is the one of these with the lowest sweep perplexity (the least damaging edit that removes recall).
3. Controls on the chosen layers, each at the strength that matches the K-FAC edit's sweep perplexity
   (bisection on a log scale of the amount removed): SVD truncation, per-side truncation, and the
   product-rule mask in a random orthonormal basis. BalancedSubnet (supervised on the sweep split)
   is trained once at its configured strength.
4. Every method is evaluated on the *holdout* split and the control probes, held-out perplexity and
   nDCG@10 against the unedited model, and the downstream task suite with retention and paired
   bootstrap confidence intervals.

Expensive steps are cached under ``MEMKFAC_HOME/cache`` by content: factors by (model, corpus split,
factor arguments); sweep and matching measurements by (model, eigenbasis, edit config, data); chosen
edits and the BalancedSubnet as checkpoints; downstream item scores by model weights. A rerun only
recomputes what changed. Sweep checkpoints are deleted once measured (a 135M checkpoint is 540 MB).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from memkfac.arguments import CompareArguments
from memkfac.canaries import check_canary_kinds
from memkfac.devices import resolve_device, resolve_dtype
from memkfac.editing import EditArguments, edit_model
from memkfac.errors import MemkfacError
from memkfac.evaluate import EvalArguments, HeldOut, evaluate_model, reference_topk, write_tables
from memkfac.fingerprint import model_fingerprint, sha256_file
from memkfac.generation import probes_token_ids
from memkfac.locks import DirectoryLock
from memkfac.memorization import memorization_rows, summarize
from memkfac.models import load_config, load_model, load_tokenizer
from memkfac.paths import atomic_file, check_output_file, memkfac_home, safe_name, write_json
from memkfac.tables import make_table, new_run_id, write_table
from memkfac.utility import perplexity

REPORT_HEADER = "<!-- memkfac compare report -->\n"  # marks the reports a later run may replace


def _is_report(path: Path) -> bool:
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
    control: dict = field(default_factory=dict)
    perplexity: float = math.nan
    ndcg: float = math.nan
    downstream: dict = field(default_factory=dict)  # pooled retention and per-task rows


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _pooled(rows: list[dict]) -> dict:
    """Table-1 aggregate over rows regardless of split (n, strict %, loose %, avg_lev)."""
    if not rows:
        return {}
    (summary,) = summarize([r | {"split": "all"} for r in rows])
    return {k: summary[k] for k in ("n_probes", "strict_pct", "loose_pct", "avg_lev")}


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
        self.forget = [
            prompt + gold
            for p, (prompt, gold) in zip(probes, ids, strict=True)
            if p.kind == "memorized" and p.split == "sweep"
        ]
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
    def _edit_key(self, config: EditArguments) -> str:
        eig = None if config.method == "svd" else sha256_file(self.eig_dir / "meta.json")
        return _key(self.base_fp, eig, asdict(config))

    def edit(self, config: EditArguments) -> Path:
        """The edited checkpoint for ``config``, from the cache or written now."""
        out = self.cache / "edits" / self._edit_key(config)
        if not (out / "memkfac_manifest.json").is_file():
            edit_model(
                self.model_dir,
                None if config.method == "svd" else self.eig_dir,
                config,
                out,
                progress=False,
                device=self.device,
            )
        return out

    def sweep_point(self, config: EditArguments, with_recall: bool) -> dict:
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
                memorization_rows(model, tokenizer, self.sweep_probes, self.args.batch_size, progress=False)
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

    # -- controls at matched perplexity --------------------------------------------------------------
    def matched_control(
        self, method: str, kfac: EditArguments, target_ppl: float, log
    ) -> tuple[EditArguments, dict]:
        """Bisection on log(amount removed) so the control's sweep perplexity matches ``target_ppl``."""

        def config_for(amount: float) -> EditArguments:
            if method == "svd":
                return EditArguments(
                    kfac.layers, kfac.projections, method="svd", svd_drop=amount, seed=self.args.seed
                )
            return EditArguments(
                kfac.layers, kfac.projections, keep_mass=1 - amount, method=method, seed=self.args.seed
            )

        lo, hi = math.log(1e-4), math.log(0.99)
        best = None
        for _ in range(self.args.match_steps):
            amount = math.exp((lo + hi) / 2)
            point = self.sweep_point(config_for(amount), with_recall=False) | {"amount": amount}
            gap = abs(math.log(point["ppl"] / target_ppl))
            if best is None or gap < best[0]:
                best = (gap, point)
            log(f"  {method} remove {amount:.4g}: sweep ppl {point['ppl']:.3f} (target {target_ppl:.3f})")
            if point["ppl"] < target_ppl:
                lo = math.log(amount)
            else:
                hi = math.log(amount)
        point = best[1]
        return config_for(point["amount"]), point

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
        retain = load_split(self.corpus_dir, "finetune")[: a.bsn_retain_blocks].tolist()
        key = _key(
            self.base_fp,
            asdict(bsn_args),
            forget,
            corpus_fingerprint(self.corpus_dir, "finetune"),
            a.bsn_retain_blocks,
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


def _span(layers) -> str:
    layers = sorted(layers)
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}-{layers[-1]}" if contiguous and len(layers) > 1 else ",".join(map(str, layers))


def _setting(config: EditArguments) -> str:
    where = f"layers {_span(config.layers)} {'+'.join(config.projections)}"
    if config.method == "svd":
        return f"{where}, drop {config.svd_drop:.4g} of singular directions"
    return f"{where}, rho {config.keep_mass:.6g}"


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
    ``report_path`` (default MEMKFAC_HOME/reports/comparison-<probe_set>.md), which may replace an
    earlier report but no other file unless ``overwrite``. The cache is locked for the whole run: a
    second comparison in the same MEMKFAC_HOME is refused at once.
    """
    args = args or CompareArguments()
    probe_set = safe_name(probe_set, "probe set name")
    report_path = (
        Path(report_path) if report_path else memkfac_home() / "reports" / f"comparison-{probe_set}.md"
    )
    c = Comparison(model_dir, probes, corpus_dir, args, progress, device, dtype)
    for path in (report_path, report_path.with_suffix(".json")):
        check_output_file(path, overwrite=overwrite, inputs=[model_dir, corpus_dir], owns=_is_report)
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

    chosen: list[tuple[str, str, Path, str, dict]] = [
        ("base", "base", c.model_dir, "unedited", {"ppl": c.base_sweep_ppl()}),
        ("K-FAC", f"kfac-l{_span(kfac.layers)}-r{kfac.keep_mass}", c.edit(kfac), _setting(kfac), kfac_point),
    ]
    names = {"svd": "SVD", "per_side": "per-side", "random": "random basis"}
    for method in args.controls:
        log(f"{names[method]} control at matched sweep perplexity {target:.3f}")
        config, point = c.matched_control(method, kfac, target, log)
        amount = config.svd_drop if method == "svd" else 1 - config.keep_mass
        chosen.append(
            (
                names[method],
                f"{method}-l{_span(kfac.layers)}-x{amount:.4g}",
                c.edit(config),
                _setting(config),
                point,
            )
        )
    if args.bsn:
        log("BalancedSubnet on the sweep split")
        bsn_dir, bsn_args = c.balanced_subnet(kfac.layers)
        setting = f"layers {_span(kfac.layers)} {'+'.join(args.projections)}, ratio {bsn_args['ratio']}"
        chosen.append(
            ("BalancedSubnet", f"bsn-l{_span(kfac.layers)}-p{bsn_args['ratio']}", bsn_dir, setting, {})
        )

    run_id = new_run_id()
    reference = reference_topk(c.model_dir, c.heldout, progress=progress, device=c.device, dtype=c.dtype)
    results = []
    base_downstream = None
    for method, variant, model_dir_i, setting, point in chosen:
        log(f"evaluating {method} ({variant})")
        variant = safe_name(variant, "variant")
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
            control=_pooled([r for r in rows if r["kind"] == "control"]),
            perplexity=tables["perplexity"].column("perplexity")[0].as_py(),
            ndcg=tables["ndcg"].column("ndcg")[0].as_py(),
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
    log(report)
    log(f"wrote {report_path}")
    return results


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
        "trained_strict_pct": r.trained["strict_pct"],
        "trained_loose_pct": r.trained["loose_pct"],
        "trained_avg_lev": r.trained["avg_lev"],
        "control_strict_pct": r.control.get("strict_pct"),
        "control_loose_pct": r.control.get("loose_pct"),
        "control_avg_lev": r.control.get("avg_lev"),
        "perplexity": r.perplexity,
        "ndcg": r.ndcg,
        "downstream_retention": d.get("retention"),
        "downstream_ci_low": d.get("ci_low"),
        "downstream_ci_high": d.get("ci_high"),
    }


def format_report(results: list[MethodResult], args: CompareArguments, kfac_point: dict) -> str:
    """The comparison as Markdown: the Table-1 rows, then downstream retention per task."""
    t0 = results[0]
    lines = [
        "| method | setting | trained strict % | trained loose % | trained avgLev | control strict % "
        "| perplexity | nDCG@10 | downstream retention [95% CI] | sweep perplexity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d = r.downstream
        ds = f"{d['retention']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]" if d.get("retention") else "-"
        control = f"{r.control['strict_pct']:.1f}" if r.control else "-"
        sweep_ppl = f"{r.sweep['ppl']:.3f}" if r.sweep else "-"
        lines.append(
            f"| {r.method} | {r.setting} | {r.trained['strict_pct']:.1f} | {r.trained['loose_pct']:.1f} "
            f"| {r.trained['avg_lev']:.3f} | {control} | {r.perplexity:.3f} | {r.ndcg:.3f} | {ds} "
            f"| {sweep_ppl} |"
        )
    lines += [
        "",
        f"Trained: the {t0.trained['n_probes']} holdout-split trained probes. "
        f"Control: {t0.control.get('n_probes', 0)} never-trained probes.",
        (
            f"K-FAC layers and rho were chosen on the sweep split: strict recall <= {args.max_sweep_recall}% "
            "there at the lowest perplexity"
            if kfac_point["recall_removed"]
            else f"No swept K-FAC edit brought sweep recall to <= {args.max_sweep_recall}%; the row is the "
            "lowest-recall edit"
        )
        + f" (sweep strict {kfac_point['strict_pct']:.1f}%, sweep perplexity {kfac_point['ppl']:.3f}).",
        "The SVD, per-side and random-basis controls edit the same layers, each at the strength matching "
        "that sweep perplexity. BalancedSubnet was trained once at its configured strength (not matched).",
        "Perplexity: exp(mean token NLL) on held-out blocks. "
        "nDCG@10: paper formula, against the unedited model.",
    ]
    tasks = [t["task"] for t in t0.downstream.get("tasks", [])]
    if tasks:
        lines += ["", "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        base_scores = {t["task"]: t["score"] for t in t0.downstream["tasks"]}
        lines.append("| base (accuracy) | " + " | ".join(f"{base_scores[t]:.3f}" for t in tasks) + " |")
        for r in results[1:]:
            by_task = {t["task"]: t for t in r.downstream["tasks"]}
            cells = [
                f"{by_task[t]['retention']:.2f} [{by_task[t]['retention_ci_low']:.2f}, "
                f"{by_task[t]['retention_ci_high']:.2f}]"
                for t in tasks
            ]
            lines.append(f"| {r.method} (retention) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

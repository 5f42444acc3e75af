"""Wall time and accuracy of the default downstream suite on one model (default: SmolLM2-135M).

Usage: python bench/bench_downstream.py [--model SPEC] [--n-items 200] [--batch-size 16] [--threads N]
Prints a table (task, accuracy, chance, seconds) and writes bench/results/downstream_suite.json.
"""

from __future__ import annotations

import argparse

import torch

from memkfac.downstream import DownstreamArguments, run_downstream
from memkfac.models import DEFAULT_MODEL, resolve_model
from memkfac.tasks import GENERATORS

from common import timed, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--n-items", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    rows = []
    for task in GENERATORS:  # one task per call so each gets its own wall time
        run_args = DownstreamArguments(tasks=(task,), n_items=args.n_items, batch_size=args.batch_size)
        scores, seconds = timed(lambda run_args=run_args: run_downstream(model_dir, run_args, progress=False))
        result = scores[task]
        rows.append(
            {
                "task": task,
                "accuracy": result.score,
                "chance": 1 / GENERATORS[task][2],
                "seconds": seconds,
            }
        )
        print(
            f"{task:28s} acc {result.score:.3f}  chance {1 / GENERATORS[task][2]:.3f}  "
            f"{rows[-1]['seconds']:.1f} s",
            flush=True,
        )
    total = sum(r["seconds"] for r in rows)
    print(f"{'total':28s} {total:.1f} s for {len(rows)} tasks x {args.n_items} items")
    write_result(
        "downstream_suite",
        {
            "model": args.model,
            "n_items": args.n_items,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "rows": rows,
            "total_seconds": total,
        },
    )


if __name__ == "__main__":
    main()

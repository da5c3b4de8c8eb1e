"""Several runs side by side: `python -m lvrpo_fast.train.compare RUN_DIR ... --task interleaved --level 0.8`.

Reads each run directory's summary.json and metrics.jsonl, prints a Markdown table (one row per run:
its seed, whether --process-rewards was on, the held-out reward of the task after the warm-up and
after GRPO, the gain, the first GRPO step whose held-out evaluation reached --level, and the mean of
the evaluations after the warm-up's) and, with
--output, plots the held-out reward of the task against the GRPO step for every run (process-reward
runs solid, outcome-only runs dashed, one color per seed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

from . import task as T


def load_run(path: str, task: str) -> Dict:
    """A run's configuration and its held-out evaluations of `task`: {"path", "seed", "process_rewards",
    "outcome_weight", "warmup_steps", "curve": [(GRPO step, held-out reward)], "summary"}."""
    with open(os.path.join(path, "summary.json")) as f:
        summary = json.load(f)
    config = summary["config"]
    with open(os.path.join(path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    key = f"heldout_{task}"
    curve = [(r["step"] - config["warmup_steps"], r[key]) for r in rows if r.get("phase") == "eval" and key in r]
    if not curve:
        raise ValueError(f"{path}: no held-out evaluation of the {task} task in metrics.jsonl")
    return {"path": path, "seed": config["seed"], "process_rewards": bool(config.get("process_rewards", False)),
            "outcome_weight": config.get("outcome_weight"), "warmup_steps": config["warmup_steps"],
            "curve": curve, "summary": summary}


def first_step_at(curve, level: float) -> Optional[int]:
    """The first GRPO step whose held-out reward is >= level (None if none is)."""
    return next((step for step, value in curve if value >= level), None)


def mean_after_warmup(curve) -> Optional[float]:
    """The mean held-out reward over the evaluations after GRPO step 0 (less noisy than one evaluation)."""
    values = [value for step, value in curve if step > 0]
    return sum(values) / len(values) if values else None


def table(runs: List[Dict], task: str, level: float) -> str:
    lines = [f"| seed | advantages | held-out {task} after warm-up | after GRPO | gain | first GRPO step >= {level:g} "
             f"| mean of the GRPO-phase evaluations |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        summary = run["summary"]
        kind = (f"process + outcome (w = {run['outcome_weight']:g})" if run["process_rewards"]
                else "outcome only")
        reached = first_step_at(run["curve"], level)
        lines.append(f"| {run['seed']} | {kind} | {summary['warmup'][task]:.3f} | {summary['final'][task]:.3f} | "
                     f"{summary['improvement'][task]:+.3f} | {'not reached' if reached is None else reached} | "
                     f"{mean_after_warmup(run['curve']):.3f} |")
    return "\n".join(lines)


def plot(runs: List[Dict], task: str, level: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({run["seed"] for run in runs})
    colors = {seed: f"C{i}" for i, seed in enumerate(seeds)}
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        steps, values = zip(*run["curve"])
        kind = "process + outcome" if run["process_rewards"] else "outcome only"
        ax.plot(steps, values, color=colors[run["seed"]], linestyle="-" if run["process_rewards"] else "--",
                marker="o", markersize=3, label=f"seed {run['seed']}, {kind}")
    ax.axhline(level, color="0.5", linewidth=1, linestyle=":", label=f"level {level:g}")
    ax.set_xlabel("GRPO step (0: end of the warm-up)")
    ax.set_ylabel(f"held-out mean reward, {task} task (0 to 1)")
    ax.set_title(f"{task}: process-reward advantages against outcome-only")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lvrpo_fast.train.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of python -m lvrpo_fast.train")
    parser.add_argument("--task", default="interleaved", choices=T.TASKS, help="the task whose held-out reward is compared")
    parser.add_argument("--level", type=float, default=0.8, help="the held-out reward level whose first step is reported")
    parser.add_argument("--output", default=None, help="where to write the plot (PNG); none by default")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        runs = [load_run(path, args.task) for path in args.runs]
    except (OSError, ValueError, KeyError) as exc:
        parser.error(str(exc))
    print(table(runs, args.task, args.level))
    if args.output:
        plot(runs, args.task, args.level, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a run shows its user: the progress bars, the summary (printed and summary.json) and curves.png."""
from __future__ import annotations

import sys
from typing import Dict, List, Optional

from . import task as T

# Names of the per-step tensors --check-every compares, in the order they are reported.
CHECKED = ("loss", "grad_hidden", "grad_weight", "grad_bias")


def _mean(values) -> Optional[float]:
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------
class Progress:
    """One bar per phase, warm-up then GRPO: a GRPO step (sampling, scoring, several updates) costs many
    warm-up steps, so one bar over both would project the warm-up's speed onto GRPO. Each bar's
    estimate of the time left is its own phase's. A disabled Progress imports nothing."""

    def __init__(self, warmup_steps: int, grpo_steps: int, step: int, enabled: bool):
        self.totals = {"warmup": warmup_steps, "grpo": grpo_steps}
        self.first = {"warmup": 0, "grpo": warmup_steps}
        self.enabled = enabled
        self.phase: Optional[str] = None
        self.bar = None
        self.step = step

    def _open(self, phase: str) -> None:
        from tqdm import tqdm

        self.close()
        self.phase = phase
        done = min(max(0, self.step - self.first[phase]), self.totals[phase])
        self.bar = tqdm(total=self.totals[phase], initial=done, desc="warm-up" if phase == "warmup" else "GRPO",
                        unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, record: Dict) -> None:
        """After each training step, with its metrics row."""
        if self.enabled and record["phase"] != self.phase:
            self._open(record["phase"])  # counts the steps of the phase done before this one
        self.step += 1
        if not self.enabled:
            return
        self.bar.update(1)
        self.bar.set_postfix_str(describe_step(record), refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def describe_step(record: Dict) -> str:
    """A training step's row in words, for the progress bar."""
    if record["phase"] == "warmup":
        return f"loss {record['sft_loss']:.3f} nats/token, {record['tokens_per_s']:.0f} tokens/s"
    kl = f"KL {record['kl']:.2e}; " if "kl" in record else ""  # no KL term at --beta 0
    rewards = ", ".join(f"{t} {record[f'reward_{t}']:.2f}" for t in T.TASKS if f"reward_{t}" in record)
    return f"reward: {rewards}; {kl}{record['tokens_per_s']:.0f} tokens/s"


# ----------------------------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------------------------
def check_summary(history: List[Dict], check_every: int) -> Optional[Dict]:
    """What --check-every saw over the whole run (resumed parts included), or None when it was off."""
    rows = [r for r in history if r.get("phase") == "grpo" and "check_loss_max_diff" in r]
    if not check_every or not rows:
        return None
    names = [n for n in CHECKED if f"check_{n}_max_diff" in rows[0]]

    def largest(what):
        return {n: max(r[f"check_{n}_{what}"] for r in rows) for n in names}

    return {"every": check_every, "checks": len(rows), "passed": len(rows),
            "max_diff_reference": largest("max_diff"), "max_error_float64": largest("max_error"),
            "reference_error_float64": largest("reference_error")}


def format_check(check: Dict) -> str:
    """One line: how many checks passed and the largest differences they saw."""
    parts = ", ".join(f"{n} {check['max_error_float64'][n]:.1e} ({check['reference_error_float64'][n]:.1e})"
                      for n in check["max_error_float64"])
    return (f"--check-every {check['every']}: {check['passed']} of {check['checks']} checks passed; largest "
            f"|fused - float64| (the reference's own): {parts}")


def build_summary(*, command: str, config: Dict, device: str, backend: str, world_size: int, parameters: int,
                  max_new_tokens: int, wall_time_s: float, heldout_prompts_per_task: int, history: List[Dict],
                  warmup_eval: Dict, final: Dict) -> Dict:
    grpo = [r for r in history if r.get("phase") == "grpo"]
    tasks = [t for t in T.TASKS if f"heldout_{t}" in final]
    temperature = config["temperature"] if config["eval_temperature"] is None else config["eval_temperature"]
    summary = {
        "command": command,
        "config": config,
        "device": device,
        "dtype": config["dtype"],
        "backend": backend,
        "world_size": world_size,
        "parameters": parameters,
        "max_new_tokens": max_new_tokens,
        "wall_time_s": wall_time_s,
        "heldout_decoding": "greedy" if temperature == 0 else f"sampled at temperature {temperature:g}",
        "heldout_prompts_per_task": heldout_prompts_per_task,
        "warmup": {t: warmup_eval[f"heldout_{t}"] for t in tasks},
        "final": {t: final[f"heldout_{t}"] for t in tasks},
        "tokens_per_s_mean": _mean([r["tokens_per_s"] for r in grpo]),
        "loss_time_s_mean": _mean([r["loss_time_s"] for r in grpo]),
    }
    summary["improvement"] = {t: summary["final"][t] - summary["warmup"][t] for t in tasks}
    check = check_summary(history, config["check_every"])
    if check is not None:
        summary["check"] = check
    return summary


def format_summary(summary: Dict) -> str:
    cfg = summary["config"]
    lines = [f"lvrpo_fast.train: {cfg['warmup_steps']} warm-up + {cfg['steps']} GRPO steps in "
             f"{summary['wall_time_s']:.1f} s on {summary['device']} ({summary['world_size']} process(es)), "
             f"backend {summary['backend']}, {summary['parameters']} parameters",
             f"held-out mean reward ({summary['heldout_decoding']}, {summary['heldout_prompts_per_task']} prompts "
             f"per task), after warm-up -> after GRPO:"]
    for t in summary["final"]:
        lines.append(f"  {t:14s} {summary['warmup'][t]:.3f} -> {summary['final'][t]:.3f} "
                     f"({summary['improvement'][t]:+.3f})")
    if "check" in summary:
        lines.append(format_check(summary["check"]))
    lines.append(f"run directory: {cfg['output_dir']} (the trained model: {cfg['output_dir']}/model, "
                 f"usable as --model)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# curves.png
# ----------------------------------------------------------------------------------------------
INTERLEAVED_PANEL = "interleaved reward, its parts"
# Every panel holds one quantity in one unit (its y label). A series: (rows, key, legend label), rows
# being "warmup", "grpo" or "eval" (the held-out evaluations).
PANELS = (
    ("reward", "mean reward (0 to 1)",
     [("grpo", f"reward_{t}", f"train {t}") for t in T.TASKS]
     + [("eval", f"heldout_{t}", f"held-out {t}") for t in T.TASKS]),
    ("generation reward, its parts", "score (0 to 1)",
     [("grpo", "generation_alignment", "train alignment"), ("grpo", "generation_structure", "train structure"),
      ("eval", "heldout_generation_alignment", "held-out alignment"),
      ("eval", "heldout_generation_structure", "held-out structure")]),
    (INTERLEAVED_PANEL, "score (0 to 1)",
     [(phase, f"{prefix}interleaved_{part}", f"{word} {part}") for phase, prefix, word in
      (("grpo", "", "train"), ("eval", "heldout_", "held-out")) for part in ("relevance", "alignment", "structure")]),
    ("warm-up loss", "nats / token", [("warmup", "sft_loss", "negative log-likelihood")]),
    ("KL to the reference", "nats / token", [("grpo", "kl", "KL (estimate)")]),
    ("entropy of the policy", "nats / token", [("grpo", "entropy", "entropy")]),
    ("clipped tokens", "fraction of tokens",
     [("grpo", "clip_ratio_low", "low"), ("grpo", "clip_ratio_high", "high"),
      ("grpo", "clip_ratio_region", "either")]),
    ("throughput", "completion tokens / s", [("warmup", "tokens_per_s", "warm-up"), ("grpo", "tokens_per_s", "GRPO")]),
    ("time per GRPO step", "seconds",
     [("grpo", "step_time_s", "whole step"), ("grpo", "sample_time_s", "sampling"),
      ("grpo", "logprob_time_s", "old + reference log-probs"), ("grpo", "loss_time_s", "fused loss")]),
)
BOUNDARY = "phase_boundary"


def curves_figure(history: List[Dict], warmup_steps: int):
    """The per-step curves (matplotlib's Agg backend: no display needed): one panel per quantity, the
    warm-up shaded and its end marked on every panel. Each series' line has the metric key as gid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {phase: [r for r in history if r.get("phase") == phase] for phase in ("warmup", "grpo", "eval")}
    last = max([r["step"] for r in history] + [warmup_steps, 1])
    # The interleaved task's panel only when it was trained (a fourth column otherwise empty).
    panels = [p for p in PANELS if p[0] != INTERLEAVED_PANEL
              or any(r.get(key) is not None for phase, key, _ in p[2] for r in rows[phase])]
    columns = 4 if len(panels) <= 8 else 5
    fig, axes = plt.subplots(2, columns, figsize=(5 * columns, 8.5), sharex=True)
    for ax in axes.flat[len(panels):]:
        fig.delaxes(ax)
    for ax, (title, unit, series) in zip(axes.flat, panels):
        for phase, key, label in series:
            pts = [(r["step"], r[key]) for r in rows[phase] if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=label, gid=key, marker="o" if phase == "eval" else None,
                        markersize=3, alpha=0.8 if phase == "eval" else 0.6)
        if warmup_steps > 0:
            ax.axvspan(0, warmup_steps, color="0.93", zorder=0)
        ax.axvline(warmup_steps, color="0.4", linestyle="--", linewidth=1, gid=BOUNDARY,
                   label="end of warm-up" if ax is axes.flat[0] else None)
        ax.set_xlim(0, last)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.set_xlabel("step (warm-up shaded, then GRPO)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_curves(history: List[Dict], warmup_steps: int, path: str) -> None:
    import matplotlib.pyplot as plt

    fig = curves_figure(history, warmup_steps)
    fig.savefig(path, dpi=90)
    plt.close(fig)

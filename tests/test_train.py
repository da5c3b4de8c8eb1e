"""Tests of the trainer (python -m lvrpo_fast.train): the task's rewards and data order, the command
line and its errors, a short run of the default end to end (the CI version), the fused-loss check,
the progress bars, the summary and the plot, checkpoints (format, damage, pruning, full disk, leftovers),
the run directory's lock, signals, resume reproducibility, a local Hugging Face model (and the trained
model/ folder as one), and two data-parallel processes.

Every run here is tiny (a few steps, a few hundred scenes); the full default run and its numbers are
in the README."""
import errno
import json
import os
import pickle
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import lvrpo_fast
from lvrpo_fast.train import checkpoints as CK
from lvrpo_fast.train import cli
from lvrpo_fast.train import config as C
from lvrpo_fast.train import loop, report, rundir
from lvrpo_fast.train import task as T
from lvrpo_fast.train.check import FusedCheckError

# A tiny run: the default model and task at a fraction of their size and length.
TINY = ["--train-scenes", "96", "--eval-scenes", "12", "--hidden-size", "32", "--num-layers", "1",
        "--num-heads", "2", "--warmup-batch-size", "8", "--prompts-per-step", "2",
        "--group-size", "3", "--no-progress"]


def run_main(args):
    return cli.main(TINY + list(args))


def checkpoint_files(run_dir):
    return sorted(n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith("step_"))


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timings(records):
    return [{k: v for k, v in r.items() if k not in loop.TIMING_KEYS} for r in records]


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------
def test_reference_completions_score_one_and_splits_are_disjoint():
    data = T.build_task(seed=3, train_scenes=300, heldout_scenes=50, tasks=T.TASKS)
    for t in ("generation", "interleaved"):
        train_scenes = {e.scene for e in data.train[t]}
        assert not train_scenes & {e.scene for e in data.heldout[t]}
    for split in (data.train, data.heldout):
        for t in T.TASKS:
            for e in split[t]:
                assert T.reward(e, e.target, stopped=True)["reward"] == 1.0
                # Not stopping within the budget is never a full score.
                assert T.reward(e, e.target, stopped=False)["reward"] < 1.0


def test_generation_reward_by_hand():
    # Caption: red circle at top-left, blue square at center -> 2 objects, 5 constraints.
    scene = tuple([(0, 0)] + [None] * 3 + [(2, 1)] + [None] * 4)
    example = T.Example("generation", "p", T.render_image(scene), scene,
                        caption_objects=((0, 0, 0), (4, 2, 1)))
    cells = [T.visual_token(c) for c in scene]
    # Right shape but wrong color at the center: 4 of 5 constraints; structure perfect.
    cells_wrong = list(cells)
    cells_wrong[4] = "<red-square>"
    r = T.reward(example, " ".join(["<img>"] + cells_wrong + ["</img>"]), True)
    assert r["alignment"] == pytest.approx(4 / 5) and r["structure"] == 1.0
    assert r["reward"] == pytest.approx(T.GEN_ALIGNMENT_WEIGHT * 0.8 + (1 - T.GEN_ALIGNMENT_WEIGHT))
    # An extra object breaks the count constraint only.
    cells_extra = list(cells)
    cells_extra[8] = "<green-triangle>"
    assert T.reward(example, " ".join(["<img>"] + cells_extra + ["</img>"]), True)["alignment"] == pytest.approx(4 / 5)
    # Eight cells, no closing tag, not stopped: open 1, close 0, grid 1 - 1/9.
    r = T.reward(example, " ".join(["<img>"] + cells[:8]), False)
    assert r["structure"] == pytest.approx((1 + 0 + 8 / 9) / 3)
    # Garbage: no structure and no constraint, but still a number in [0, 1].
    r = T.reward(example, "red red red", True)
    assert r["reward"] == 0.0


def test_interleaved_task_leaves_the_default_tasks_as_they_were():
    """Selecting the interleaved task draws its stories from a generator of its own and adds its two words
    to the vocabulary only then: the default tasks' examples, vocabulary (and so the model's
    initialization) do not change."""
    default = T.build_task(seed=5, train_scenes=60, heldout_scenes=8)
    every = T.build_task(seed=5, train_scenes=60, heldout_scenes=8, tasks=T.TASKS)
    assert set(default.train) == set(T.DEFAULT_TASKS) and list(every.train) == list(T.TASKS)
    for t in T.DEFAULT_TASKS:
        assert default.train[t] == every.train[t] and default.heldout[t] == every.heldout[t]
    assert T.STORY not in T.vocabulary() and {T.STORY, T.THEN} <= set(T.vocabulary(T.TASKS))
    stories = every.train["interleaved"] + every.heldout["interleaved"]
    assert {len(e.caption_objects) for e in stories} == set(T.STORY_SCENES)
    e = stories[0]
    assert e.prompt == T.STORY + " " + f" {T.THEN} ".join(T.caption_of(o) for o in e.caption_objects)


def _story():
    """A three-scene story: red circle at top-left, blue square at center, green triangle at bottom."""
    objects = ((0, 0, 0), (4, 2, 1), (7, 1, 2))
    scene = T.partial_scene(objects)
    prompt = "story " + " then ".join(T.caption_of(o) for o in objects)
    target = " ".join(f"{T.caption_of(o)} {T.render_image(T.partial_scene(objects[:k + 1]))}"
                      for k, o in enumerate(objects))
    return T.Example("interleaved", prompt, target, scene, caption_objects=objects), objects


def test_interleaved_reward_by_hand():
    example, objects = _story()
    w = T.STORY_WEIGHTS
    perfect = T.reward(example, example.target, True)
    assert perfect["reward"] == 1.0 and [r for _, r in perfect["steps"]] == [1.0, 1.0, 1.0]
    assert [end for end, _ in perfect["steps"]] == [14, 29, 44]  # the word index of each </img>
    scenes = example.target.split()
    # Scene 2's caption names a yellow square (3 of its 4 words right): relevance 3/4; its image still shows
    # the blue square the prompt asked for, which is not what its caption says: alignment 4/5 (the
    # red circle 2 + the count 1 + the square's shape 1, not its color); structure intact.
    wrong = list(scenes)
    wrong[15] = "yellow"
    r = T.reward(example, " ".join(wrong), True)
    step2 = w["relevance"] * 0.75 + w["alignment"] * 4 / 5 + w["structure"] * 1.0
    assert r["steps"][1][1] == pytest.approx(step2)
    # Scene 3's image reads the captions as written: the yellow square is not drawn, the rest is (6 of 7).
    step3 = w["relevance"] + w["alignment"] * 6 / 7 + w["structure"]
    assert r["steps"][2][1] == pytest.approx(step3)
    assert r["relevance"] == pytest.approx((1 + 0.75 + 1) / 3)
    assert r["alignment"] == pytest.approx((1 + 4 / 5 + 6 / 7) / 3)
    assert r["structure"] == 1.0
    # Two scenes of three, then stopped: scene 3 counts 0, the story's ending 0.
    two = " ".join(scenes[:30])
    r = T.reward(example, two, True)
    assert len(r["steps"]) == 2 and r["relevance"] == pytest.approx(2 / 3)
    assert r["structure"] == pytest.approx(2 / 4)
    # A fourth scene is an extra step worth 0 and spoils the ending.
    r = T.reward(example, example.target + " " + " ".join(scenes[:15]), True)
    assert [s for _, s in r["steps"]] == [1.0, 1.0, 1.0, 0.0] and r["structure"] == pytest.approx(3 / 4)
    # Not stopped: everything but the ending.
    assert T.reward(example, example.target, False)["structure"] == pytest.approx(3 / 4)
    # No scene closed at all: no step, reward from nothing.
    r = T.reward(example, "red circle at top-left <img> <empty>", True)
    assert r["steps"] == [] and r["reward"] == 0.0


def test_understanding_reward_exact_answer_only():
    data = T.build_task(seed=1, train_scenes=40, heldout_scenes=4)
    for e in data.train["understanding"]:
        wrong = next(w for w in T.COLORS + T.POSITIONS if w != e.target)
        assert T.reward(e, wrong, True)["reward"] == 0.0
        assert T.reward(e, f"{e.target} {e.target}", True)["reward"] == 0.0
        assert T.reward(e, f" {e.target} ", True)["reward"] == 1.0


def test_data_stream_order_and_state():
    a = T.DataStream(7, seed=5, stream=1)
    first = a.take(10)  # crosses an epoch boundary
    assert sorted(first[:7]) == list(range(7))
    state = a.state_dict()
    rest = a.take(12)
    b = T.DataStream(7, seed=5, stream=1)
    b.load_state_dict(state)
    assert b.take(12) == rest
    assert T.DataStream(7, seed=6, stream=1).take(7) != first[:7] or T.DataStream(7, 5, 2).take(7) != first[:7]


@pytest.mark.parametrize("tasks, n, expected", [
    (("understanding", "generation"), 32, {"understanding": 8, "generation": 24}),
    (("interleaved",), 5, {"interleaved": 5}),
    (("generation", "interleaved"), 8, {"generation": 6, "interleaved": 2}),
    (("understanding", "generation", "interleaved"), 3, {"understanding": 1, "generation": 1, "interleaved": 1}),
    (("understanding", "generation", "interleaved"), 32, {"understanding": 6, "generation": 18, "interleaved": 8}),
])
def test_batches_split_between_the_selected_tasks(tasks, n, expected):
    """--understanding-share and --interleaved-share at their defaults (0.25 each)."""
    trainer = loop.Trainer.__new__(loop.Trainer)
    trainer.tasks = tasks
    trainer.cfg = C.TrainConfig()
    assert trainer._split(n, 0.25) == expected
    assert trainer._split(n, 0.25, reading=True) == {"understanding": n}
    assert list(trainer._split(n, 0.25)) == [t for t in T.TASKS if t in tasks]  # the batch order


def test_ranks_take_disjoint_slices_of_one_global_batch():
    class Procs:
        world = 2

    slices = []
    for rank in range(2):
        trainer = loop.Trainer.__new__(loop.Trainer)
        trainer.procs = Procs()
        trainer.procs.rank = rank
        trainer.streams = {"s": T.DataStream(50, seed=0, stream=0)}
        slices.append([trainer._local("s", 4) for _ in range(3)])
    for step in range(3):
        assert len(set(slices[0][step]) | set(slices[1][step])) == 8


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
def test_help_shows_every_flag_with_its_default_and_the_run_directory():
    text = C.build_parser().format_help()
    for flag in ("--group-size", "--prompts-per-step", "--max-new-tokens", "--temperature", "--learning-rate",
                 "--beta", "--epsilon-low", "--epsilon-high", "--loss-type", "--importance-sampling-level",
                 "--steps", "--seed", "--device", "--dtype", "--output-dir", "--backend", "--check-every",
                 "--resume", "--overwrite", "--model"):
        assert flag in text
    assert "(default: 8)" in text and "(default: grpo)" in text
    # The run directory: where it is by default, what a second run needs, and model/ as --model.
    assert "default runs/lvrpo under the current directory" in text
    assert "refused unless --resume" in text and "--overwrite" in text
    assert "model/" in text and "usable as --model" in text


def test_help_imports_nothing_heavy():
    """--help parses before anything beyond lvrpo_fast itself is imported (its speed: the benchmark in
    benchmarks/test_bench_train_cli.py)."""
    code = ("import runpy, sys\nsys.argv = ['lvrpo_fast.train', '--help']\ntry:\n"
            "    runpy.run_module('lvrpo_fast.train', run_name='__main__', alter_sys=True)\n"
            "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "print('HEAVY', [m for m in ('transformers', 'matplotlib', 'tokenizers', 'safetensors') "
            "if m in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: python -m lvrpo_fast.train" in proc.stdout
    assert "HEAVY []" in proc.stdout


@pytest.mark.parametrize("args, named", [
    (["--group-size", "1"], "--group-size"),
    (["--temperature", "0"], "--temperature"),
    (["--learning-rate", "-1e-3"], "--learning-rate"),
    (["--epsilon-low", "-0.1"], "--epsilon-low"),
    (["--beta", "-1"], "--beta"),
    (["--loss-type", "ppo"], "--loss-type"),
    (["--dtype", "float64"], "--dtype"),
    (["--prompts-per-step", "1"], "--prompts-per-step"),
    (["--warmup-fraction", "1.5"], "--warmup-fraction"),
    (["--importance-sampling-level", "batch"], "--importance-sampling-level"),
    (["--hidden-size", "30", "--num-heads", "4"], "--hidden-size"),
    (["--model", "/nonexistent/model"], "--model"),
    (["--resume", "--overwrite"], "--resume"),
    (["--warmup-steps", "20", "--warmup-reading-steps", "50"], "lower it too, or leave it out"),
    (["--tasks", "understanding,drawing"], "--tasks"),
    (["--tasks", "generation,generation"], "--tasks"),
    (["--tasks", "understanding,generation,interleaved", "--prompts-per-step", "2"], "--prompts-per-step"),
    (["--outcome-weight", "1.5"], "--outcome-weight"),
    (["--interleaved-share", "-0.5"], "--interleaved-share"),
])
def test_bad_values_fail_before_any_work(args, named, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        C.parse_args(["--output-dir", str(out)] + args)
    assert exc.value.code == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("warmup, reading", [(None, 50), (400, 50), (20, 2), (0, 0)])
def test_reading_steps_follow_the_warmup_when_not_given(warmup, reading, tmp_path):
    args = ["--output-dir", str(tmp_path / "run")] + ([] if warmup is None else ["--warmup-steps", str(warmup)])
    assert C.parse_args(args).warmup_reading_steps == reading
    assert C.parse_args(args + ["--warmup-reading-steps", "0"]).warmup_reading_steps == 0


@pytest.mark.parametrize("case", ["file", "below a file", "proc", "unwritable", "creation fails"])
def test_an_unusable_output_dir_is_a_clean_rc2_error(case, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    if case == "file":
        out.write_text("not a directory")
    elif case == "below a file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "run"
    elif case == "proc":
        out = "/proc/lvrpo_fast_run"
    elif case == "unwritable":
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        out = tmp_path / "ro" / "run"
        if os.geteuid() == 0:  # root writes anywhere: make the permission check see what a user would
            monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)
    else:  # passes the checks, then the file system refuses
        def refuse(path, exist_ok=False):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        monkeypatch.setattr(rundir.os, "makedirs", refuse)
    rc = run_main(["--output-dir", str(out), "--warmup-steps", "1", "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "python -m lvrpo_fast.train: error: --output-dir" in err and "Traceback" not in err
    if case == "proc":
        assert "/proc" in err
    if case in ("unwritable", "creation fails"):
        assert "not writable" in err


def test_refuses_to_overwrite_a_previous_run(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert run_main(["--output-dir", str(tmp_path), "--warmup-steps", "1", "--steps", "1"]) == 2
    assert "--resume" in capsys.readouterr().err


def _hold_lock(run_dir, ready):
    rundir.RunLock(run_dir).acquire("holder")
    ready.set()
    signal.pause()


def test_a_second_run_on_one_directory_is_refused_while_the_first_runs(tmp_path, capsys):
    """The lock: refused while its holder (another process) lives; free again once the holder is
    killed with SIGKILL, which leaves its .lock file behind."""
    import multiprocessing

    run = tmp_path / "run"
    run.mkdir()
    ctx = multiprocessing.get_context("fork")  # a fresh interpreter would spend seconds importing torch
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(run), ready))
    holder.start()
    args = ["--output-dir", str(run), "--warmup-steps", "1", "--steps", "1"]
    try:
        assert ready.wait(60)
        assert run_main(args) == 2
        err = capsys.readouterr().err
        assert f"is in use by another run (pid {holder.pid}" in err
        assert not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.join()
    assert (run / ".lock").exists()
    assert run_main(args) == 0  # the killed holder's lock died with it


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------
def test_short_default_run_writes_metrics_plot_checkpoints_and_summary(tmp_path, capsys):
    """The CI version of the default run: every output of the run directory, and the check mode on."""
    run = tmp_path / "run"
    args = ["--output-dir", str(run), "--warmup-steps", "3", "--steps", "3", "--eval-every", "2", "--save-every", "2",
            "--check-every", "1", "--beta", "0.04", "--num-iterations", "2"]
    rc = run_main(args)
    assert rc == 0
    records = metrics(run)
    grpo = [r for r in records if r["phase"] == "grpo"]
    assert [r["step"] for r in grpo] == [4, 5, 6]
    for r in grpo:
        for key in ("reward_understanding", "reward_generation", "kl", "clip_ratio_low", "clip_ratio_high",
                    "clip_ratio_region", "entropy", "tokens_per_s", "loss_time_s", "check_loss_max_diff",
                    "check_loss_max_error", "check_grad_weight_reference_error"):
            assert np.isfinite(r[key]), key
        assert 0.0 <= r["reward_understanding"] <= 1.0 and 0.0 <= r["reward_generation"] <= 1.0
        assert r["entropy"] > 0 and r["kl"] >= 0
    evals = [r for r in records if r["phase"] == "eval"]
    assert [e["tag"] for e in evals] == ["warmup", "grpo", "final"]
    with open(run / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    for t in T.DEFAULT_TASKS:
        assert summary["warmup"][t] == evals[0][f"heldout_{t}"]
        assert summary["final"][t] == evals[-1][f"heldout_{t}"]
    assert summary["command"] == "python -m lvrpo_fast.train " + shlex.join(TINY + args)
    # --check-every says what it saw: in summary.json and in one printed line.
    check = summary["check"]
    assert check["checks"] == check["passed"] == 3 and check["every"] == 1
    assert check["max_diff_reference"]["loss"] == max(r["check_loss_max_diff"] for r in grpo)
    assert set(check["max_error_float64"]) == {"loss", "grad_hidden", "grad_weight"}
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("--check-every"))
    assert "3 of 3 checks passed" in line and "grad_weight" in line
    assert checkpoint_files(run) == ["step_000004.safetensors", "step_000006.safetensors"]
    assert (run / "model" / "config.json").exists()
    assert not [n for n in os.listdir(run) if ".tmp" in n]


def test_process_steps_end_at_each_scene_and_once_at_the_end_otherwise():
    """Trainer._steps packs a story's scenes (each ending at its </img> token, with its step reward), one
    step at the last token of any other completion (its reward), and one step rewarded 0 for a story
    that closes no scene."""
    from lvrpo_fast.train import model as M

    example, _ = _story()
    tokenizer = M.build_tokenizer(T.TASKS)
    trainer = loop.Trainer.__new__(loop.Trainer)
    trainer.tokenizer, trainer.device = tokenizer, torch.device("cpu")
    trainer.scene_close_id = trainer._scene_close_id()
    two_scenes = " ".join(example.target.split()[:30])
    texts = [two_scenes, example.target, "red circle", "<img> <empty> </img>"]
    examples = [example, example, example, T.Example("generation", "p", "t", example.scene, caption_objects=())]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    completion_ids, completion_mask = M.right_pad(ids, tokenizer.pad_token_id, "cpu")
    batch = M.Batch(None, None, completion_ids, completion_mask, torch.ones(4, dtype=torch.bool))
    scores = [T.reward(e, t, True) for e, t in zip(examples, texts)]
    rewards, ends, offsets = trainer._steps(scores, batch)
    assert offsets.tolist() == [0, 2, 5, 6, 7]
    assert ends.tolist() == [14, 29, 14, 29, 44, 2, 3]  # the last tokens of "red circle <eos>" and of row 3
    for b in range(2):
        for s_ in range(int(offsets[b]), int(offsets[b + 1])):
            assert int(completion_ids[b, ends[s_]]) == trainer.scene_close_id
    expected = [r for _, r in scores[0]["steps"]] + [r for _, r in scores[1]["steps"]] + [0.0, scores[3]["reward"]]
    assert rewards.tolist() == pytest.approx(expected)


def test_interleaved_run_with_process_rewards_gives_the_loss_per_token_advantages(tmp_path, monkeypatch):
    """All three tasks, --process-rewards and --check-every: the loss receives advantages [B, T] from
    process_advantages, constant along each completion of the other tasks (one step at its end, the
    same advantage as the outcome one); without the flag, [B]."""
    seen = []
    exact = lvrpo_fast.fused_linear_grpo_loss

    def recording(hidden, weight, targets, mask, advantages, **kwargs):
        seen.append((advantages.detach().clone(), mask.clone()))
        return exact(hidden, weight, targets, mask, advantages, **kwargs)

    monkeypatch.setattr(lvrpo_fast, "fused_linear_grpo_loss", recording)
    common = ["--tasks", "understanding,generation,interleaved", "--prompts-per-step", "3", "--warmup-steps", "3",
              "--steps", "2", "--eval-every", "1", "--num-iterations", "1"]
    run = tmp_path / "process"
    assert run_main(common + ["--output-dir", str(run), "--process-rewards", "--check-every", "1"]) == 0
    G = 3
    assert len(seen) == 4  # each GRPO step's update and its --check-every comparison
    for advantages, mask in seen:
        assert advantages.shape == mask.shape and advantages.shape[0] == 3 * G
        for b in range(2 * G):  # understanding, then generation: one step at the end
            live = advantages[b][mask[b]]
            assert torch.equal(live, live[:1].expand_as(live))
    records = metrics(run)
    grpo = [r for r in records if r["phase"] == "grpo"]
    assert all(np.isfinite(r[k]) for r in grpo for k in ("reward_interleaved", "interleaved_relevance",
                                                           "interleaved_alignment", "interleaved_structure"))
    final = [r for r in records if r.get("tag") == "final"][0]
    assert {"heldout_interleaved", "heldout_interleaved_alignment"} <= set(final)
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["final"]) == ["understanding", "generation", "interleaved"]
    seen.clear()
    assert run_main(common + ["--output-dir", str(tmp_path / "outcome")]) == 0
    assert [tuple(a.shape) for a, _ in seen] == [(3 * G,), (3 * G,)]


def test_check_every_stops_with_a_report_when_the_fused_loss_is_off(tmp_path, monkeypatch):
    exact = lvrpo_fast.fused_linear_grpo_loss

    def off_by_a_little(hidden, weight, *args, **kwargs):
        loss, metrics_ = exact(hidden, weight, *args, **kwargs)
        # relative (moves the gradients) and absolute (moves a loss that happens to be ~0) error
        return loss * (1 + 1e-3) + 1e-3, metrics_

    monkeypatch.setattr(lvrpo_fast, "fused_linear_grpo_loss", off_by_a_little)
    cfg = C.parse_args(TINY + ["--output-dir", str(tmp_path), "--warmup-steps", "1", "--steps", "2",
                               "--check-every", "2"])
    trainer = loop.Trainer(cfg)
    try:
        with pytest.raises(FusedCheckError) as exc:
            trainer.run()
    finally:
        trainer.close()
    report_ = str(exc.value)
    assert "at step 2" in report_  # the first GRPO step is not checked (every 2), the second is
    assert "lvrpo_fast.testing" in report_  # judged by the package's closeness rule
    rows = report_.splitlines()[1:]
    for name in ("loss", "grad_hidden", "grad_weight"):
        assert any(r.split()[0] == name for r in rows)
    assert "FAIL" in rows[0] and rows[0].split()[0] == "loss"


def test_check_every_judges_by_the_package_closeness_rule(tmp_path, monkeypatch):
    """No tolerance of the trainer's own: with lvrpo_fast.testing's rule made exact (no reference error
    allowance, zero tolerances), a correct fused loss fails the check."""
    from lvrpo_fast import testing

    monkeypatch.setattr(testing, "REF_FACTOR", 0.0)
    monkeypatch.setitem(testing.TOLERANCES, torch.float32, (0.0, 0.0))
    cfg = C.parse_args(TINY + ["--output-dir", str(tmp_path), "--warmup-steps", "1", "--steps", "1",
                               "--check-every", "1"])
    trainer = loop.Trainer(cfg)
    try:
        with pytest.raises(FusedCheckError, match="bound 0.0 x reference error"):
            trainer.run()
    finally:
        trainer.close()


def test_progress_shows_a_bar_per_phase_in_words(tmp_path, capsys):
    run_args = [a for a in TINY if a != "--no-progress"] + ["--output-dir", str(tmp_path / "run"),
                                                           "--warmup-steps", "2", "--steps", "3"]
    assert cli.main(run_args) == 0
    err = capsys.readouterr().err
    assert "warm-up: 100%" in err and " 2/2 " in err  # its own total: the warm-up's steps
    assert "GRPO: 100%" in err and " 3/3 " in err
    assert "reward: understanding" in err and "generation" in err and "KL" in err and "tokens/s" in err
    grpo_row = {"phase": "grpo", "reward_understanding": 0.25, "reward_generation": 0.5, "tokens_per_s": 10.0}
    assert report.describe_step(grpo_row) == "reward: understanding 0.25, generation 0.50; 10 tokens/s"  # --beta 0


def test_curves_mark_the_phases_on_every_panel_with_one_unit_each():
    history = ([{"step": s, "phase": "warmup", "sft_loss": 3.0 / s, "tokens_per_s": 100.0} for s in range(1, 5)]
               + [{"step": 4, "phase": "eval", "tag": "warmup", "heldout_understanding": 0.5,
                   "heldout_generation": 0.4}]
               + [{"step": s, "phase": "grpo", "reward_understanding": 0.5, "reward_generation": 0.4, "kl": 1e-4,
                   "entropy": 1.0, "clip_ratio_low": 0.0, "clip_ratio_high": 0.01, "clip_ratio_region": 0.01,
                   "tokens_per_s": 50.0, "step_time_s": 1.0, "sample_time_s": 0.5, "logprob_time_s": 0.1,
                   "loss_time_s": 0.2, "generation_alignment": 0.3, "generation_structure": 0.6}
                  for s in range(5, 9)])
    import matplotlib.pyplot as plt

    fig = report.curves_figure(history, warmup_steps=4)
    try:
        seconds = {k for k in loop.TIMING_KEYS if k.endswith("_s")}
        nats = {"sft_loss", "kl", "entropy"}
        plotted = set()
        for ax in fig.axes:
            assert ax.get_ylabel(), ax.get_title()
            boundary = [line for line in ax.lines if line.get_gid() == report.BOUNDARY]
            assert len(boundary) == 1 and set(boundary[0].get_xdata()) == {4}, ax.get_title()
            keys = {line.get_gid() for line in ax.lines} - {report.BOUNDARY}
            plotted |= keys
            assert not (keys & seconds and keys & nats), (ax.get_title(), keys)
        assert {"sft_loss", "kl", "entropy", "loss_time_s", "reward_understanding", "heldout_generation"} <= plotted
    finally:
        plt.close(fig)


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path, capsys):
    common = ["--warmup-steps", "3", "--steps", "4", "--save-every", "2", "--eval-every", "2", "--beta", "0.04",
              "--num-iterations", "2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_main(["--output-dir", str(whole)] + common) == 0
    # Stops after step 5; the newest checkpoint is step 4, so step 5 is run again on resume.
    assert run_main(["--output-dir", str(parts), "--stop-after", "5"] + common) == 0
    assert not (parts / "summary.json").exists()
    capsys.readouterr()
    assert run_main(["--output-dir", str(parts), "--resume"] + common) == 0
    assert f"resuming from step 4 of 7 ({parts / 'checkpoints' / 'step_000004.safetensors'})" in capsys.readouterr().err

    assert without_timings(metrics(whole)) == without_timings(metrics(parts))
    a = CK.load(str(whole / "checkpoints" / "step_000007.safetensors"))
    b = CK.load(str(parts / "checkpoints" / "step_000007.safetensors"))
    for part in ("model", "ref_model"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), key

    # Resuming the finished run adds nothing: no step, no second final evaluation.
    before = (parts / "metrics.jsonl").read_text()
    assert run_main(["--output-dir", str(parts), "--resume"] + common) == 0
    assert "finished at step 7 already" in capsys.readouterr().err
    assert (parts / "metrics.jsonl").read_text() == before
    # ... and if it was stopped before its summary was written, writes the summary only.
    os.remove(parts / "summary.json")
    assert run_main(["--output-dir", str(parts), "--resume"] + common) == 0
    assert (parts / "metrics.jsonl").read_text() == before
    assert json.loads((parts / "summary.json").read_text())["final"] == json.loads(
        (whole / "summary.json").read_text())["final"]


@pytest.mark.parametrize("backend, dtype", [("cpp", "float32"), ("cpp", "bfloat16"), ("triton", "float32")])
def test_batch_invariant_first_update_is_exactly_on_policy(backend, dtype, tmp_path, monkeypatch):
    """--batch-invariant: the old policy's log-probs (fused_linear_logprobs, forward only) and those
    inside the loss (fused_linear_grpo_loss) have the same bits, so the first update of a step has
    every ratio exactly 1 and clips nothing. A one-byte chunk budget makes the two passes cut the batch
    differently (one row per chunk in the first, one sequence per chunk in the second)."""
    monkeypatch.setenv("LVRPO_CHUNK_BYTES", "1")
    # The loss kernel's own inputs, token by token: a mean ratio of 1.0 alone could hide a rounding.
    module = lvrpo_fast.backends.primitives(backend)
    real = module.grpo_token_loss
    differing = []

    def spy(logp, logp_old, logp_ref, logp_sampling, advantages, mask, *rest):
        differing.append(int((logp != logp_old)[mask].sum()))
        return real(logp, logp_old, logp_ref, logp_sampling, advantages, mask, *rest)

    monkeypatch.setattr(module, "grpo_token_loss", spy)
    run = tmp_path / "run"
    assert run_main(["--output-dir", str(run), "--warmup-steps", "1", "--steps", "2", "--num-iterations", "1",
                     "--backend", backend, "--dtype", dtype, "--batch-invariant", "--beta", "0.04"]) == 0
    assert len(differing) > 2 and not any(differing), differing
    grpo = [r for r in metrics(run) if r["phase"] == "grpo"]
    assert len(grpo) == 2
    for r in grpo:
        assert r["ratio"] == 1.0, r
        assert r["clip_ratio_low"] == r["clip_ratio_high"] == r["clip_ratio_region"] == 0.0, r
    assert json.loads((run / "summary.json").read_text())["config"]["batch_invariant"] is True


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def _tiny_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return {"step": 3, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": [CK.rng_state(torch.device("cpu"))], "ref_model": None,
            "history": [{"step": 1, "loss": 0.1 + 0.2, "nan": float("nan"), "tiny": 5e-324, "neg0": -0.0}],
            "tuple": (1, "two", [3.5, None])}


def test_checkpoint_round_trip_is_exact_and_never_unpickles(monkeypatch):
    state = _tiny_state()
    data = CK.serialize(state)

    def no_pickle(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    back = CK.deserialize(data)
    for key, value in state["model"].items():
        assert torch.equal(back["model"][key], value)
    assert set(back["optimizer"]["state"]) == set(state["optimizer"]["state"])  # int keys stay ints
    for index, moments in state["optimizer"]["state"].items():
        for k, v in moments.items():
            assert torch.equal(back["optimizer"]["state"][index][k], v)
    assert back["optimizer"]["param_groups"][0]["betas"] == state["optimizer"]["param_groups"][0]["betas"]
    row, row_back = state["history"][0], back["history"][0]
    assert row_back["loss"] == row["loss"] and row_back["tiny"] == row["tiny"] and np.isnan(row_back["nan"])
    assert str(row_back["neg0"]) == "-0.0"
    assert back["tuple"] == (1, "two", [3.5, None])
    # The RNG states round-trip: the same draws after restoring them.
    CK.set_rng_state(back["rng"][0], torch.device("cpu"))
    draws = (torch.rand(3), np.random.rand(3), [__import__("random").random() for _ in range(3)])
    CK.set_rng_state(state["rng"][0], torch.device("cpu"))
    assert torch.equal(torch.rand(3), draws[0]) and np.array_equal(np.random.rand(3), draws[1])
    assert [__import__("random").random() for _ in range(3)] == draws[2]


def test_every_flipped_bit_of_a_checkpoint_is_detected():
    state = {"step": 2, "w": torch.randn(3, 5), "b": torch.arange(4), "history": [{"x": 0.5}]}
    data = bytearray(CK.serialize(state))
    for i in range(len(data)):
        data[i] ^= 1 << (i % 8)
        with pytest.raises(CK.CheckpointError):
            CK.deserialize(bytes(data))
        data[i] ^= 1 << (i % 8)
    assert torch.equal(CK.deserialize(bytes(data))["w"], state["w"])


def _flip_a_bit(path, offset_from_end=20):
    data = bytearray(open(path, "rb").read())
    data[-offset_from_end] ^= 0x10
    open(path, "wb").write(bytes(data))


def test_damaged_checkpoints_are_moved_aside_never_ranked_newest(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--output-dir", str(run), "--warmup-steps", "3", "--steps", "3", "--save-every", "1",
              "--keep-checkpoints", "2"]
    assert run_main(common + ["--stop-after", "3"]) == 0
    assert checkpoint_files(run) == ["step_000002.safetensors", "step_000003.safetensors"]
    _flip_a_bit(run / "checkpoints" / "step_000003.safetensors")
    (run / "checkpoints" / "step_999999.safetensors").write_bytes(b"garbage that ranks first by step")
    (run / "checkpoints" / "step_000001.pt").write_bytes(pickle.dumps({"step": 1}))  # the old pickled format
    capsys.readouterr()
    assert run_main(common + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "step_000003.safetensors cannot be loaded (checksum mismatch" in err
    assert "step_999999.safetensors cannot be loaded" in err and "step_000001.pt cannot be loaded" in err
    assert "falling back to" in err and "step_000002.safetensors" in err
    assert "resuming from step 2 of 6" in err
    # The fresh checkpoints were kept (the damaged ones no longer rank first and prune them away).
    assert checkpoint_files(run) == ["step_000005.safetensors", "step_000006.safetensors"]
    assert sorted(os.listdir(run / "checkpoints" / CK.UNLOADABLE)) == [
        "step_000001.pt", "step_000003.safetensors", "step_999999.safetensors"]
    assert [r["step"] for r in metrics(run) if r["phase"] != "eval"] == [1, 2, 3, 4, 5, 6]


def test_resume_with_only_damaged_checkpoints_stops_with_an_error(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--output-dir", str(run), "--warmup-steps", "3", "--steps", "2", "--save-every", "1"]
    assert run_main(common + ["--stop-after", "2"]) == 0
    for name in checkpoint_files(run):
        _flip_a_bit(run / "checkpoints" / name)
    rows = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert run_main(common + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "error: --resume: no checkpoint in" in err and "can be loaded" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == rows  # nothing appended, nothing restarted


def test_leftover_temporary_files_are_removed_on_the_next_start(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--output-dir", str(run), "--warmup-steps", "2", "--steps", "1", "--save-every", "1"]
    assert run_main(common + ["--stop-after", "1"]) == 0
    leftovers = [run / "checkpoints" / ".step_000002.safetensors.tmp4242", run / ".metrics.jsonl.tmp4242",
                 run / ".model.tmp4242"]
    for path in leftovers[:2]:
        path.write_bytes(b"half a file")
    leftovers[2].mkdir()
    capsys.readouterr()
    assert run_main(common + ["--resume"]) == 0
    assert "removed 1 temporary file(s)" in capsys.readouterr().err
    assert not any(p.exists() for p in leftovers)


@pytest.mark.parametrize("target", ["checkpoint", "metrics"])
def test_a_full_disk_is_one_clear_error_and_leaves_no_orphan(target, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real = CK._write_all
    needed = []

    def full(f, data):
        hit = (".safetensors.tmp" in f.name and "step_000002" in f.name) if target == "checkpoint" else (
            f.name.endswith("metrics.jsonl") and b'"step": 2' in data)
        if not hit:
            return real(f, data)
        needed.append(len(data))
        real(f, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CK, "_write_all", full)
    assert run_main(["--output-dir", str(run), "--warmup-steps", "3", "--steps", "1", "--save-every", "1"]) == 1
    err = capsys.readouterr().err
    assert len(needed) == 1 and "Traceback" not in err
    folder = run / "checkpoints" if target == "checkpoint" else run
    assert (f"error: no space left on the device of {folder}" in err and f"needs {needed[0]} bytes" in err
            and "--resume" in err)
    assert not [n for n in os.listdir(run) + os.listdir(run / "checkpoints") if ".tmp" in n]
    assert checkpoint_files(run) == ["step_000001.safetensors"]
    CK.load(str(run / "checkpoints" / "step_000001.safetensors"))
    rows = (run / "metrics.jsonl").read_text()
    assert rows.endswith("\n") and all(json.loads(line) for line in rows.splitlines())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_last_finished_step_and_says_how_to_resume(signum, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    common = ["--warmup-steps", "3", "--steps", "2", "--save-every", "0", "--eval-every", "0"]
    real = loop.Trainer.warmup_step

    def step(self):
        if self.step == 1:  # arrives during step 2
            os.kill(os.getpid(), signum)
        return real(self)

    monkeypatch.setattr(loop.Trainer, "warmup_step", step)
    assert run_main(["--output-dir", str(run)] + common) == 128 + signum
    monkeypatch.setattr(loop.Trainer, "warmup_step", real)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"lvrpo_fast.train: stopped by {signal.Signals(signum).name} after step 2 of 5")
    assert checkpoint_files(run) == ["step_000002.safetensors"]
    # The printed command resumes it, to the same end as a run never stopped.
    command = shlex.split(last.split("resume with: ")[1])
    assert command[:3] == ["python", "-m", "lvrpo_fast.train"] and command[-1] == "--resume"
    assert cli.main(command[3:]) == 0
    assert "resuming from step 2 of 5" in capsys.readouterr().err
    if signum == signal.SIGTERM:
        assert run_main(["--output-dir", str(tmp_path / "whole")] + common) == 0
        assert without_timings(metrics(run)) == without_timings(metrics(tmp_path / "whole"))


def test_a_repeated_signal_is_one_request_a_later_second_one_stops_at_once(tmp_path, capsys, monkeypatch):
    """Two SIGINTs at once (torchrun forwards the terminal's Ctrl-C to workers that got it already) are
    one request: a checkpoint at the step boundary. A second signal after the window stops at once."""
    run = tmp_path / "run"
    real = loop.Trainer.warmup_step

    def twice(self):
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(loop.Trainer, "warmup_step", twice)
    assert run_main(["--output-dir", str(run), "--warmup-steps", "4", "--steps", "1", "--save-every", "0"]) == 130
    assert "stopped by SIGINT after step 2 of 5, checkpoint saved" in capsys.readouterr().err.splitlines()[-1]
    assert checkpoint_files(run) == ["step_000002.safetensors"]

    monkeypatch.setattr(cli.StopRequest, "REPEAT_WINDOW_S", 0.0)

    def step(self):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(loop.Trainer, "warmup_step", step)
    assert run_main(["--output-dir", str(run), "--warmup-steps", "4", "--steps", "1", "--save-every", "1",
                     "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "stopped by SIGINT during step 3, without saving; the newest checkpoint is step 2" in err.splitlines()[-1]
    assert checkpoint_files(run) == ["step_000001.safetensors", "step_000002.safetensors"]


# ----------------------------------------------------------------------------------------------
# Models and processes
# ----------------------------------------------------------------------------------------------
def _tiny_hf_model(folder):
    """A tiny GPT-2 and a byte-level BPE tokenizer trained locally on the task's text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    data = T.build_task(seed=0, train_scenes=64, heldout_scenes=1)
    corpus = [e.prompt + " " + e.target for t in T.DEFAULT_TASKS for e in data.train[t]]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=256,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_trains_a_local_hugging_face_model(tmp_path):
    _tiny_hf_model(tmp_path / "hf")
    run = tmp_path / "run"
    assert run_main(["--model", str(tmp_path / "hf"), "--output-dir", str(run), "--warmup-steps", "1",
                     "--steps", "2", "--beta", "0.04"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    # The BPE tokenizer splits visual tokens, so the budget follows the tokenizer, not the default's 12.
    assert summary["max_new_tokens"] > 12
    grpo = [r for r in metrics(run) if r["phase"] == "grpo"]
    assert len(grpo) == 2 and all(np.isfinite(r["loss"]) for r in grpo)


def test_the_trained_model_folder_is_usable_as_model_and_the_run_is_quiet(tmp_path, capfd):
    """model/ of a run trains further as --model (no warm-up needed: the reading steps follow it), and a
    --no-progress run prints no transformers deprecation warning nor its loading / writing bars."""
    import warnings

    from transformers.utils import logging as hf_logging

    first = tmp_path / "first"
    assert run_main(["--output-dir", str(first), "--warmup-steps", "2", "--steps", "1"]) == 0
    hf_logging.warning_once.cache_clear()  # transformers warns once per process: forget earlier tests' warnings
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_main(["--model", str(first / "model"), "--output-dir", str(tmp_path / "second"),
                         "--warmup-steps", "0", "--steps", "2"]) == 0
    out, err = capfd.readouterr()
    assert not [str(w.message) for w in caught]
    for noise in ("past_key_values", "deprecated", "Loading weights", "Writing model shards", "%|"):
        assert noise not in err, err[-3000:]
    assert "held-out mean reward" in out


def test_two_data_parallel_processes(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lvrpo_fast.train"] + TINY + ["--output-dir", str(run), "--warmup-steps", "2", "--steps", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["command"].startswith("torchrun --nproc_per_node 2 -m lvrpo_fast.train --train-scenes")
    steps = [r["step"] for r in metrics(run) if r["phase"] != "eval"]
    assert steps == [1, 2, 3, 4]  # one writer: no step twice
    assert proc.stdout.count("held-out mean reward") == 1
    assert "past_key_values" not in proc.stderr


def test_compare_tabulates_and_plots_runs(tmp_path, capsys):
    """python -m lvrpo_fast.train.compare: the first GRPO step at the level, the gain and the mean of the
    GRPO-phase evaluations, read from each run directory."""
    from lvrpo_fast.train import compare

    for name, process, curve in (("a", False, [0.5, 0.6, 0.7, 0.75]), ("b", True, [0.5, 0.72, 0.7, 0.8])):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": 10 + 5 * i, "phase": "eval", "tag": "grpo", "heldout_interleaved": v}
                for i, v in enumerate(curve)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = {"seed": 3, "warmup_steps": 10, "process_rewards": process, "outcome_weight": 0.5}
        summary = {"config": config, "warmup": {"interleaved": curve[0]}, "final": {"interleaved": curve[-1]},
                   "improvement": {"interleaved": curve[-1] - curve[0]}}
        (run / "summary.json").write_text(json.dumps(summary))
    plot = tmp_path / "compare.png"
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--level", "0.7", "--output", str(plot)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert rows[0] == "| 3 | outcome only | 0.500 | 0.750 | +0.250 | 10 | 0.683 |"
    assert rows[1] == "| 3 | process + outcome (w = 0.5) | 0.500 | 0.800 | +0.300 | 5 | 0.740 |"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

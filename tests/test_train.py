"""Tests of the trainer (python -m lvrpo_fast.train): the task's rewards and data order, the command
line and its errors, a short run of the default end to end (the CI version), the fused-loss check,
checkpoint / resume reproducibility, a local Hugging Face model, and two data-parallel processes.

Every run here is tiny (a few steps, a few hundred scenes); the full default run and its numbers are
in the README."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lvrpo_fast
from lvrpo_fast.train import config as C
from lvrpo_fast.train import loop
from lvrpo_fast.train import task as T

# A tiny run: the default model and task at a fraction of their size and length.
TINY = ["--train-scenes", "96", "--eval-scenes", "12", "--hidden-size", "32", "--num-layers", "1",
        "--num-heads", "2", "--warmup-batch-size", "8", "--warmup-reading-steps", "1", "--prompts-per-step", "2",
        "--group-size", "3", "--no-progress"]


def run_main(args):
    return loop.main(TINY + list(args))


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timings(records):
    return [{k: v for k, v in r.items() if k not in loop.TIMING_KEYS} for r in records]


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------
def test_reference_completions_score_one_and_splits_are_disjoint():
    data = T.build_task(seed=3, train_scenes=300, heldout_scenes=50)
    train_scenes = {e.scene for e in data.train["generation"]}
    assert not train_scenes & {e.scene for e in data.heldout["generation"]}
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
def test_help_shows_every_flag_with_its_default():
    text = C.build_parser().format_help()
    for flag in ("--group-size", "--prompts-per-step", "--max-new-tokens", "--temperature", "--learning-rate",
                 "--beta", "--epsilon-low", "--epsilon-high", "--loss-type", "--importance-sampling-level",
                 "--steps", "--seed", "--device", "--dtype", "--output-dir", "--backend", "--check-every",
                 "--resume", "--model"):
        assert flag in text
    assert "(default: 8)" in text and "(default: grpo)" in text


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
    (["--loss-type", "cispo", "--importance-sampling-level", "sequence"], "--importance-sampling-level"),
    (["--hidden-size", "30", "--num-heads", "4"], "--hidden-size"),
    (["--model", "/nonexistent/model"], "--model"),
    (["--resume", "--overwrite"], "--resume"),
])
def test_bad_values_fail_before_any_work(args, named, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        C.parse_args(["--output-dir", str(out)] + args)
    assert exc.value.code == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_refuses_to_overwrite_a_previous_run(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert run_main(["--output-dir", str(tmp_path), "--warmup-steps", "1", "--steps", "1"]) == 2
    assert "--resume" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------
def test_short_default_run_writes_metrics_plot_checkpoints_and_summary(tmp_path):
    """The CI version of the default run: every output of the run directory, and the check mode on."""
    run = tmp_path / "run"
    rc = run_main(["--output-dir", str(run), "--warmup-steps", "3", "--steps", "3", "--eval-every", "2",
                   "--save-every", "2", "--check-every", "1", "--beta", "0.04", "--num-iterations", "2"])
    assert rc == 0
    records = metrics(run)
    grpo = [r for r in records if r["phase"] == "grpo"]
    assert [r["step"] for r in grpo] == [4, 5, 6]
    for r in grpo:
        for key in ("reward_understanding", "reward_generation", "kl", "clip_ratio_low", "clip_ratio_high",
                    "clip_ratio_region", "entropy", "tokens_per_s", "loss_time_s", "check_loss_max_diff"):
            assert np.isfinite(r[key]), key
        assert 0.0 <= r["reward_understanding"] <= 1.0 and 0.0 <= r["reward_generation"] <= 1.0
        assert r["entropy"] > 0 and r["kl"] >= 0
    evals = [r for r in records if r["phase"] == "eval"]
    assert [e["tag"] for e in evals] == ["warmup", "grpo", "final"]
    with open(run / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    for t in T.TASKS:
        assert summary["warmup"][t] == evals[0][f"heldout_{t}"]
        assert summary["final"][t] == evals[-1][f"heldout_{t}"]
    assert sorted(os.listdir(run / "checkpoints")) == ["step_000004.pt", "step_000006.pt"]
    assert (run / "model" / "config.json").exists()


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
    with pytest.raises(loop.FusedCheckError) as exc:
        trainer.run()
    report = str(exc.value)
    assert "at step 2" in report  # the first GRPO step is not checked (every 2), the second is
    for name in ("loss", "grad_hidden", "grad_weight"):
        assert name in report
    assert "FAIL" in report.splitlines()[1]  # the loss row


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    common = ["--warmup-steps", "3", "--steps", "4", "--save-every", "2", "--eval-every", "2", "--beta", "0.04",
              "--num-iterations", "2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_main(["--output-dir", str(whole)] + common) == 0
    # Stops after step 5; the newest checkpoint is step 4, so step 5 is run again on resume.
    assert run_main(["--output-dir", str(parts), "--stop-after", "5"] + common) == 0
    assert not (parts / "summary.json").exists()
    assert run_main(["--output-dir", str(parts), "--resume"] + common) == 0

    assert without_timings(metrics(whole)) == without_timings(metrics(parts))
    a = torch.load(whole / "checkpoints" / "step_000007.pt", weights_only=False)
    b = torch.load(parts / "checkpoints" / "step_000007.pt", weights_only=False)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ref_model"]:
        assert torch.equal(a["ref_model"][key], b["ref_model"][key]), key


def _tiny_hf_model(folder):
    """A tiny GPT-2 and a byte-level BPE tokenizer trained locally on the task's text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    data = T.build_task(seed=0, train_scenes=64, heldout_scenes=1)
    corpus = [e.prompt + " " + e.target for t in T.TASKS for e in data.train[t]]
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


def test_two_data_parallel_processes(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lvrpo_fast.train"] + TINY + ["--output-dir", str(run), "--warmup-steps", "2", "--steps", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    steps = [r["step"] for r in metrics(run) if r["phase"] != "eval"]
    assert steps == [1, 2, 3, 4]  # one writer: no step twice
    assert proc.stdout.count("held-out mean reward") == 1

"""verl's own FSDP engine on the CPU, plain and switched to lvrpo_fast: the harness behind the engine
tests of test_integrations_verl.py and the memory numbers in README.md.

    python tests/verl_engine_run.py parity OUT
        the cases of CASES on verl's engine on 2 processes and CASES_ONE_PROCESS on 1 (gloo), first
        plain, then after `import lvrpo_fast.integrations.verl` (the switch, as verl's external_lib
        loader imports it): one update step (train_batch) and one compute_log_prob (infer_batch) per
        case; saves (OUT.rank0, OUT.rank1) the losses, grad norms, local gradient shards, log-probs and
        entropies, and the most rows of any [..., V] tensor allocated while the engine ran.
    python tests/verl_engine_run.py memory [--vocab 151936 --hidden 256 ...] [--switched]
        one update step and one compute_log_prob at a large vocabulary in a fresh process; prints the
        peak resident memory of each.

What the CPU needs that a GPU machine would not (test-only, nothing here changes the math):
- verl selects its platform and engine by accelerator; a CPU platform (device "cpu", gloo) is
  registered and VERL_ENGINE_DEVICE=cuda picks the FSDP engine registered for GPUs.
- "sdpa" attention: verl defaults to flash_attention_2, which needs a GPU. With packed ("remove
  padding") batches verl passes position_ids and no attention mask, which flash-attention's varlen
  kernel turns into separate sequences; sdpa does not, so on the CPU the sequences of a packed
  micro-batch attend to each other. The plain and the switched run see the same hidden states either
  way, which is what the comparison needs: the switch changes only what comes after them.
- verl 0.9.1's monkey patch imports trl's AutoModelForCausalLMWithValueHead whenever trl is installed;
  trl 1.16 no longer has it. The import serves value-head models only, so it is skipped here.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

import torch

# Cases: (strategy, tied LM head, packed "remove padding" batch, calculate_entropy, FSDP param dtype).
# An untied head is FSDP2's separately wrapped case; entropy on trains through the entropy
# (entropy_coeff != 0); bf16 is verl's default mixed precision (the others run in float32, and the bf16
# case is judged against its float32 twin, CASES[0]). Only fsdp2 runs on the CPU: verl builds FSDP1 with
# sync_module_states=True, which FSDP1 allows on GPUs only.
CASES = [
    ("fsdp2", False, True, True, "fp32"),
    ("fsdp2", False, False, False, "fp32"),
    ("fsdp2", True, True, False, "fp32"),
    ("fsdp2", True, False, True, "fp32"),
    ("fsdp2", False, True, True, "bf16"),
]
CASES_ONE_PROCESS = CASES[:2]
VOCAB, HIDDEN = 301, 32
CHUNK_ROWS = 8  # rows of lvrpo_fast's [C, V] bf16 tile in these runs (float32: half), far below the tokens
BATCH, PROMPT, RESPONSE = 8, 7, 9  # per step (all ranks), left-padded prompts, right-padded responses


# ----------------------------------------------------------------------------------------------
# A CPU platform for verl
# ----------------------------------------------------------------------------------------------
def register_cpu_platform():
    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import set_platform

    class PlatformCPU(PlatformBase):
        device_name = "cpu"
        vendor_name = "cpu"
        device_module = torch.cpu

        def is_available(self):
            return True

        def current_device(self):
            return "cpu"

        def device_count(self):
            return 1

        def set_device(self, device_index):
            pass

        def synchronize(self, device_index=None):
            pass

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        def manual_seed_all(self, seed):
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings):
            pass

        def empty_cache(self):
            pass

        def get_device_capability(self, device_index=0):
            return None, None

        def communication_backend_name(self):
            return "gloo"

        def visible_devices_envvar(self):
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg):
            yield

        def profiler_start(self):
            pass

        def profiler_stop(self):
            pass

        def ray_resource_name(self):
            return "CPU"

        def ray_noset_envvars(self):
            return []

        def is_ipc_supported(self):
            return False

        def cudart(self):
            return None

    set_platform(PlatformCPU())
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"
    import verl.models.transformers.monkey_patch as monkey_patch

    monkey_patch.is_trl_available = lambda: False


def installed_state() -> dict:
    """Where verl's policy losses, ppo_loss's agg_loss and kl_penalty, the fused-kernel slot and the
    FSDP engine's methods come from, as module names: lvrpo_fast.integrations.verl* for every entry
    once the switch is installed in this process, verl's own modules before."""
    import verl.workers.utils.losses as ppo_losses
    from verl.trainer.ppo import core_algos
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    import verl.utils.kernel.linear_cross_entropy  # noqa: F401  (the module; the package exports the function)

    return {
        **{f"policy loss {name}": core_algos.POLICY_LOSS_REGISTRY[name].__module__
           for name in ("vanilla", "gspo", "cispo", "sapo")},
        "ppo_loss agg_loss": ppo_losses.agg_loss.__module__,
        "ppo_loss kl_penalty": ppo_losses.kl_penalty.__module__,
        "kernel slot": sys.modules["verl.utils.kernel.linear_cross_entropy"].linear_cross_entropy.__module__,
        "engine forward_step": FSDPEngineWithLMHead.forward_step.__module__,
        "engine _build_module": FSDPEngineWithLMHead._build_module.__module__,
        "engine _build_lora_module": FSDPEngineWithLMHead._build_lora_module.__module__,
        "EngineRegistry.new": EngineRegistry.new.__func__.__module__,
    }


# ----------------------------------------------------------------------------------------------
# A tiny model, a batch, verl's engine
# ----------------------------------------------------------------------------------------------
def save_tiny_model(path: str, tied: bool, vocab: int = VOCAB, hidden: int = HIDDEN, layers: int = 2) -> None:
    import transformers

    config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=tied, max_position_embeddings=256)
    torch.manual_seed(1234)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)


def make_batch(rank: int, world_size: int, vocab: int, batch: int, prompt: int, response: int, seed: int = 7,
               full_length: bool = False):
    """verl's rollout layout (left-padded prompts, right-padded responses) for this rank's share,
    turned into verl's no-padding layout as verl's trainer does; GRPO advantages (one per response).
    Random lengths (at least one full-length response), or every sequence full when full_length."""
    from tensordict import TensorDict
    from verl.workers.utils.padding import left_right_2_no_padding

    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(1, prompt + 1, (batch,), generator=g)
    response_len = torch.randint(1, response + 1, (batch,), generator=g)
    response_len[0] = response  # one full-length response: the padded layout has no spare column
    if full_length:
        prompt_len.fill_(prompt)
        response_len.fill_(response)
    columns = torch.arange(prompt + response)
    attention = ((columns >= prompt - prompt_len[:, None]) & (columns < prompt + response_len[:, None])).long()
    input_ids = torch.randint(0, vocab, (batch, prompt + response), generator=g) * attention
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    response_mask = attention[:, prompt:]
    old_log_probs = -torch.rand(batch, response, generator=g) * 3 - 4  # ratios far from 1: the clip acts
    advantages = (torch.randn(batch, 1, generator=g) * response_mask).contiguous()
    ref_log_prob = -torch.rand(batch, response, generator=g) * 3 - 4
    share = slice(rank * batch // world_size, (rank + 1) * batch // world_size)
    data = TensorDict({"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids,
                       "prompts": input_ids[:, :prompt], "responses": input_ids[:, prompt:],
                       "response_mask": response_mask, "old_log_probs": old_log_probs,
                       "advantages": advantages.expand(batch, response).contiguous(), "ref_log_prob": ref_log_prob},
                      batch_size=[batch])[share]
    return left_right_2_no_padding(data)


def build_engine(model_path: str, strategy: str, packed: bool, lr: float = 1e-2, micro_batch: int = 2,
                 param_dtype: str = "fp32"):
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine import EngineRegistry

    model_config = HFModelConfig(path=model_path, load_tokenizer=False, use_remove_padding=packed,
                                 override_config={"attn_implementation": "sdpa"})
    precision = {"param_dtype": param_dtype, "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    engine_config = FSDPEngineConfig(strategy=strategy, mixed_precision=precision, use_dynamic_bsz=False,
                                     micro_batch_size_per_gpu=micro_batch, infer_micro_batch_size_per_gpu=micro_batch)
    engine_config.use_remove_padding = packed  # as verl's TrainingWorker copies it from the model config
    engine = EngineRegistry.new(model_type="language_model", backend=strategy, model_config=model_config,
                                engine_config=engine_config, optimizer_config=FSDPOptimizerConfig(lr=lr, clip_grad=1e4),
                                checkpoint_config=CheckpointConfig())
    engine.initialize()
    return engine


def ppo_loss_fn(entropy: bool, loss_mode: str = "vanilla"):
    from functools import partial

    from verl.workers.config import ActorConfig
    from verl.workers.utils.losses import ppo_loss

    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio_low=0.2,
                         clip_ratio_high=0.28, entropy_coeff=0.01 if entropy else 0.0, use_kl_loss=True,
                         kl_loss_coef=0.05, policy_loss={"loss_mode": loss_mode})
    return partial(ppo_loss, config=config)


def engine_flags(data, packed: bool, entropy: bool, training: bool, global_batch_size: int, micro_batch: int = 2):
    """The non-tensor keys verl's trainer and TrainingWorker put on a batch before the engine."""
    from verl.utils import tensordict_utils as tu

    tu.assign_non_tensor(data, temperature=0.9, calculate_entropy=entropy, use_remove_padding=packed,
                         use_dynamic_bsz=False, micro_batch_size_per_gpu=micro_batch, max_token_len_per_gpu=None,
                         use_fused_kernels=False, global_batch_size=global_batch_size, compute_loss=training)
    return data


@contextlib.contextmanager
def widest_logits(vocab: int, record: dict):
    """Records in record["rows"] the most rows of any tensor [..., vocab] allocated inside the block:
    an output of an aten op that does not share storage with one of its inputs (views, such as the
    transposed LM head weight, and out= results allocate nothing), inside lvrpo_fast's fused operators too."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def storage(t):
        try:
            return t.untyped_storage().data_ptr()
        except RuntimeError:  # tensors without a plain storage (nested, ...) are never logits
            return None

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "lvrpo_fast":
                # A mode is off while its __torch_dispatch__ runs: run the fused op's own CPU kernel under
                # a fresh watch, so the tiles it allocates inside are seen too.
                with Watch():
                    return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args,
                                           **(kwargs or {}))
            out = func(*args, **(kwargs or {}))
            wide = [t for t in tree_leaves(out)
                    if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == vocab]
            if wide:
                inputs = {storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
                for t in wide:
                    if storage(t) not in inputs:
                        record["rows"] = max(record["rows"], t.numel() // vocab)
            return out

    with Watch():
        yield


def local_grad(p):
    g = p.grad
    if g is None:
        return None
    return g.to_local().clone() if hasattr(g, "to_local") else g.clone()


def run_case(model_dir: str, case, rank: int, world_size: int) -> dict:
    from verl.workers.utils.padding import no_padding_2_padding

    strategy, tied, packed, entropy, param_dtype = case
    engine = build_engine(os.path.join(model_dir, "tied" if tied else "untied"), strategy, packed,
                          param_dtype=param_dtype)
    data = make_batch(rank, world_size, VOCAB, BATCH, PROMPT, RESPONSE)
    engine_flags(data, packed, entropy, True, BATCH)
    record = {"rows": 0}
    with engine.train_mode(), widest_logits(VOCAB, record):
        out = engine.train_batch(data, loss_function=ppo_loss_fn(entropy))
        grads = {name: local_grad(p) for name, p in engine.module.named_parameters()}  # zeroed on exit
    result = {"loss": torch.tensor(out["loss"], dtype=torch.float64),
              "grad_norm": torch.tensor(out["metrics"]["grad_norm"], dtype=torch.float64),
              "pg_loss": torch.tensor(out["metrics"]["actor/pg_loss"].values, dtype=torch.float64),
              "grads": grads,
              "tokens": int(data["input_ids"].offsets()[-1])}
    # compute_log_prob after the update: the updated weights must agree too
    data = make_batch(rank, world_size, VOCAB, BATCH, PROMPT, RESPONSE, seed=8)
    engine_flags(data, packed, True, False, BATCH)
    with engine.eval_mode(), widest_logits(VOCAB, record):
        out = engine.infer_batch(data)
    # What verl's trainer keeps: the response positions (no_padding_2_padding). The last position of each
    # sequence predicts past its end; verl's padded layout labels it differently with and without fused
    # kernels (a roll over the padded rows vs. over the packed tokens), and nothing reads it.
    result["log_probs"] = no_padding_2_padding(out["model_output"]["log_probs"], data).clone()
    result["entropy"] = no_padding_2_padding(out["model_output"]["entropy"], data).clone()
    result["logit_rows"] = record["rows"]
    del engine
    return result


def _phase(rank: int, world_size: int, store: str, model_dir: str, cases) -> list:
    """The cases on a fresh gloo group of `world_size` processes (file rendezvous: no ports to pick)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        return [run_case(model_dir, case, rank, world_size) for case in cases]
    finally:
        torch.distributed.destroy_process_group()


def parity_worker(rank: int, tmp: str, out: str) -> None:
    """Rank `rank` of 2: the cases on 2 processes and (rank 0) on 1, plain, then switched.

    The switch is imported between the plain and the switched runs, in the running process, as verl's
    external_lib loader imports it in a worker."""
    os.environ["LVRPO_CHUNK_BYTES"] = str(CHUNK_ROWS * VOCAB * 2)
    torch.set_num_threads(1)
    register_cpu_platform()
    start = time.perf_counter()
    results = {}
    for mode in ("plain", "switched"):
        if mode == "switched":
            import lvrpo_fast.integrations.verl  # noqa: F401
        results[2, mode] = _phase(rank, 2, os.path.join(tmp, f"store-2-{mode}"), tmp, CASES)
        if rank == 0:
            results[1, mode] = _phase(0, 1, os.path.join(tmp, f"store-1-{mode}"), tmp, CASES_ONE_PROCESS)
    results["seconds"] = time.perf_counter() - start
    torch.save(results, f"{out}.rank{rank}")


def parity(out: str) -> None:
    """Runs parity_worker on 2 spawned processes; results in {out}.rank0 and {out}.rank1."""
    with tempfile.TemporaryDirectory() as tmp:
        for tied in (False, True):
            save_tiny_model(os.path.join(tmp, "tied" if tied else "untied"), tied)
        torch.multiprocessing.start_processes(parity_worker, args=(tmp, out), nprocs=2, start_method="spawn")


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


@contextlib.contextmanager
def peak_resident(record: dict):
    """The process's peak resident memory inside the block (Linux: VmHWM, reset through clear_refs),
    and the resident memory just before it, in GiB."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    record["before_gib"] = _resident_kib("VmRSS") / 2**20
    start = time.perf_counter()
    yield
    record["seconds"] = time.perf_counter() - start
    record["peak_gib"] = _resident_kib("VmHWM") / 2**20
    record["extra_gib"] = record["peak_gib"] - record["before_gib"]


def memory(vocab: int, hidden: int, layers: int, batch: int, prompt: int, response: int, tied: bool,
           switched: bool) -> dict:
    """One update step and one compute_log_prob of verl's engine (one process, packed batch, untied or
    tied head, entropy on) at a large vocabulary, after one warm-up step (AdamW's state exists in both
    runs); peak resident memory of each. Run plain and switched in separate processes."""
    with tempfile.TemporaryDirectory() as tmp:
        register_cpu_platform()
        model = os.path.join(tmp, "model")
        save_tiny_model(model, tied, vocab=vocab, hidden=hidden, layers=layers)
        os.environ.update(RANK="0", WORLD_SIZE="1")
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        if switched:
            import lvrpo_fast.integrations.verl  # noqa: F401
        engine = build_engine(model, "fsdp2", packed=True, lr=1e-6, micro_batch=batch)
        result = {"tokens": batch * (prompt + response)}
        for step in ("warm-up", "update"):
            data = make_batch(0, 1, vocab, batch, prompt, response, full_length=True)
            engine_flags(data, True, True, True, batch, micro_batch=batch)
            record = {}
            with engine.train_mode(), peak_resident(record):
                engine.train_batch(data, loss_function=ppo_loss_fn(entropy=True))
            result[step] = record
        data = make_batch(0, 1, vocab, batch, prompt, response, seed=8, full_length=True)
        engine_flags(data, True, True, False, batch, micro_batch=batch)
        record = {}
        with engine.eval_mode(), peak_resident(record):
            engine.infer_batch(data)
        result["compute_log_prob"] = record
        torch.distributed.destroy_process_group()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("parity")
    p.add_argument("out")
    m = sub.add_parser("memory")
    m.add_argument("--vocab", type=int, default=151936)
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--batch", type=int, default=4)
    m.add_argument("--prompt", type=int, default=128)
    m.add_argument("--response", type=int, default=384)
    m.add_argument("--tied", action="store_true")
    m.add_argument("--switched", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "parity":
        parity(args.out)
    else:
        result = memory(args.vocab, args.hidden, args.layers, args.batch, args.prompt, args.response, args.tied,
                        args.switched)
        print(f"verl FSDP2 engine, {'switched to lvrpo_fast' if args.switched else 'plain'}: V={args.vocab} "
              f"hidden={args.hidden} layers={args.layers} {'tied' if args.tied else 'untied'} head, "
              f"{result['tokens']} tokens in one micro-batch, float32")
        for step in ("update", "compute_log_prob"):
            r = result[step]
            print(f"  {step:17s} peak RSS {r['peak_gib']:.2f} GiB, {r['extra_gib']:+.2f} GiB over the "
                  f"{r['before_gib']:.2f} GiB before it, {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()

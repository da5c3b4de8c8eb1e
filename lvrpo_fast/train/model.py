"""The embedded tokenizer and model, loading a local Hugging Face model, and sampling.

Everything is built locally: the default tokenizer is a word-level `tokenizers` vocabulary of the
task (one token per word and per visual token), the default model a small Llama-style causal LM
from a transformers config. `--model PATH` instead loads a local causal LM and its tokenizer
(never from the hub), which then reads and writes the same text rendering of the task.

The trainer needs the model split in two: the body (embeddings and blocks, ending in the final
norm) that gives hidden states [B, L, D], and the LM head's weight [V, D] (and bias), which the
fused lvrpo_fast ops multiply in chunks. Models whose logits are more than a linear map of the last
hidden state (logit soft-capping, logit scaling) are not supported.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from . import task

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def build_tokenizer(tasks=task.DEFAULT_TASKS):
    """The embedded word-level tokenizer: the words of the selected tasks plus <pad>, <bos>, <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [PAD, BOS, EOS] + task.vocabulary(tasks)
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def flash_attention_available(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return importlib.util.find_spec("flash_attn") is not None


def build_default_model(tokenizer, hidden_size: int, num_layers: int, num_heads: int, max_positions: int):
    """A small Llama-style causal LM with tied embeddings, randomly initialized from the global RNG."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def load_pretrained(path: str, device: torch.device, dtype: torch.dtype):
    """A local Hugging Face causal LM and its tokenizer from `path` (no downloads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--model {path}: the tokenizer has no eos_token; the trainer needs one to end completions")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked everywhere
    kwargs = {"local_files_only": True}
    if flash_attention_available(device, dtype):
        kwargs["attn_implementation"] = "flash_attention_2"
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, tokenizer


def maybe_flash_attention(model, device: torch.device, dtype: torch.dtype):
    """Switches a freshly built model to flash-attention 2 on CUDA when flash-attn is installed."""
    if not flash_attention_available(device, dtype):
        return model
    try:
        model.set_attn_implementation("flash_attention_2")  # transformers >= 4.48
    except (AttributeError, ValueError, ImportError):
        model.config._attn_implementation = "flash_attention_2"
    return model


def body_of(model):
    """The model without its LM head: returns last_hidden_state [B, L, D] (after the final norm)."""
    return model.base_model


def head_of(model) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, torch.nn.Linear):
        raise ValueError(f"the model's output embeddings must be an nn.Linear LM head, got {type(head).__name__}")
    return head.weight, head.bias


@dataclass
class Batch:
    """Prompts left-padded to one length Lp, completions right-padded to T.

    prompt_ids / prompt_mask [B, Lp]; completion_ids / completion_mask [B, T] (mask covers the
    completion tokens up to and including the end-of-sequence token)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    stopped: torch.Tensor  # [B] bool: the model emitted its end-of-sequence token

    def full(self):
        """(input_ids [B, Lp + T], attention_mask, position_ids) of prompt + completion."""
        ids = torch.cat([self.prompt_ids, self.completion_ids], dim=1)
        # Positions after the end token attend as they did while sampling; they are masked in the loss.
        mask = torch.cat([self.prompt_mask, torch.ones_like(self.completion_mask)], dim=1)
        return ids, mask, positions(mask)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, length - len(s):] = 1
    return ids.to(device), mask.to(device)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    length = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.bool)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = True
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample(model, prompts: List[List[int]], max_new_tokens: int, temperature: float, eos_id: int, pad_id: int,
           device, autocast_dtype: Optional[torch.dtype] = None) -> Batch:
    """Samples one completion per prompt from softmax(logits / temperature); temperature 0 is greedy.

    Draws from the global torch RNG (checkpointed by the trainer), so a resumed run samples the same
    tokens. The distribution sampled is exactly the one the loss scores: the LM head applied to the
    body's last hidden state, divided by the temperature."""
    body = body_of(model)
    weight, bias = head_of(model)
    cache_name = cache_keyword(body)
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    B = prompt_ids.shape[0]
    attention = prompt_mask
    position = positions(attention)
    step_ids, cache = prompt_ids, None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens = []
    for _ in range(max_new_tokens):
        with _autocast(device, autocast_dtype):
            out = body(input_ids=step_ids, attention_mask=attention, position_ids=position,
                       use_cache=True, **{cache_name: cache})
        cache = getattr(out, cache_name)
        logits = torch.nn.functional.linear(out.last_hidden_state[:, -1].to(weight.dtype), weight, bias).float()
        if temperature == 0:
            token = logits.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1).squeeze(1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        done |= token == eos_id
        if bool(done.all()):
            break
        step_ids = token.unsqueeze(1)
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        position = position[:, -1:] + 1
    completion = torch.stack(tokens, dim=1)
    # The mask covers each completion up to and including its end token (the model learns to stop).
    ended_before = torch.cumsum((completion == eos_id).long(), dim=1) - (completion == eos_id).long()
    completion_mask = ended_before == 0
    return Batch(prompt_ids, prompt_mask, completion, completion_mask, done.clone())


def cache_keyword(body) -> str:
    """The name under which `body` takes and returns its key/value cache: `cache` in transformers 5.2x,
    where `past_key_values` still works but warns on every call, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def _autocast(device, dtype):
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def decode_completions(tokenizer, batch: Batch, eos_id: int) -> List[str]:
    """Text of each completion before its end token (the text the rewards parse)."""
    texts = []
    for ids, mask in zip(batch.completion_ids.tolist(), batch.completion_mask.tolist()):
        kept = [t for t, m in zip(ids, mask) if m and t != eos_id]
        texts.append(tokenizer.decode(kept, skip_special_tokens=False))
    return texts


@contextmanager
def transformers_progress(enabled: bool):
    """transformers' own progress bars ("Loading weights", "Writing model shards") on or off for the
    duration (--no-progress turns them off with the trainer's), restored afterwards."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def size_in_bytes(model) -> int:
    """Bytes of the model's weights (tied ones once): about the size of its saved folder."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def save_pretrained(model, tokenizer, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)

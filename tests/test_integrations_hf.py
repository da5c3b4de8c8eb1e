"""lvrpo_fast.integrations.hf: the LM head's inputs of tiny locally built transformers models give the
model's own logits, log-probabilities and gradients (tied and untied heads, a vision-language model)."""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

from lvrpo_fast import reference  # noqa: E402
from lvrpo_fast.integrations.hf import completion_hidden_states, completion_logprobs  # noqa: E402
from tolerances import assert_close_to_truth  # noqa: E402

V, L, K = 61, 11, 5  # odd vocabulary and lengths


def _llama(tied, bias=False, **extra):
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tied, **extra)
    model = transformers.LlamaForCausalLM(config).eval()
    if bias:  # a head with a bias, as some models have
        model.lm_head = torch.nn.Linear(24, V, bias=True)
    return model


def _llava():
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=8, patch_size=4, projection_dim=16)
    text = transformers.LlamaConfig(vocab_size=V, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=V - 1,
                                      vision_feature_layer=-1, vision_feature_select_strategy="full")
    return transformers.LlavaForConditionalGeneration(config).eval()


def _batch(model_kind):
    ids = torch.randint(0, V - 1, (3, L))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as generation batches have
    extra = {}
    if model_kind == "llava":
        ids[:, 2:7] = V - 1  # 4 patches + CLS per 8x8 image with patch size 4
        extra["pixel_values"] = torch.randn(3, 3, 8, 8)
    return ids, mask, extra


@pytest.mark.parametrize("kind", ["tied", "untied", "bias", "llava"])
def test_logits_from_hidden_states_equal_the_models(kind):
    model = _llava() if kind == "llava" else _llama(tied=kind == "tied", bias=kind == "bias")
    ids, mask, extra = _batch(kind)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, **extra).logits[:, L - K - 1: L - 1]
        heads = completion_hidden_states(model, ids, mask, logits_to_keep=K, **extra)
    assert heads.hidden.shape == (3, K, 24)
    if kind == "tied":
        assert heads.weight is model.get_input_embeddings().weight
    assert (heads.bias is not None) == (kind == "bias")
    torch.testing.assert_close(torch.nn.functional.linear(heads.hidden, heads.weight, heads.bias), logits,
                               rtol=1e-5, atol=1e-5)


def test_logit_scale_is_folded_into_hidden_states():
    config = transformers.CohereConfig(vocab_size=V, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, logit_scale=0.37)
    model = transformers.CohereForCausalLM(config).eval()
    ids, mask, _ = _batch("cohere")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, L - K - 1: L - 1]
        heads = completion_hidden_states(model, ids, mask, logits_to_keep=K)
    torch.testing.assert_close(heads.hidden @ heads.weight.T, logits, rtol=1e-5, atol=1e-5)


def test_softcapping_is_refused():
    config = transformers.Gemma2Config(vocab_size=V, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=12,
                                       final_logit_softcapping=30.0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    ids, mask, _ = _batch("gemma")
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        completion_hidden_states(model, ids, mask, logits_to_keep=K)


@pytest.mark.parametrize("tied", [True, False])
def test_logprobs_and_gradients_match_the_models_logits(tied):
    """completion_logprobs == log_softmax(model logits / T) at the completion, and so do the gradients
    of every parameter (the embedding matrix included, through both uses when tied)."""
    model = _llama(tied=tied).double()
    ids, mask, _ = _batch("llama")
    completion_mask = torch.rand(3, K) > 0.2
    temperature = 0.8
    weights = torch.randn(3, K, dtype=torch.float64)

    logits = model(input_ids=ids, attention_mask=mask).logits[:, L - K - 1: L - 1]
    truth_logp = torch.log_softmax(logits / temperature, -1).gather(-1, ids[:, L - K:, None])[..., 0]
    truth_logp = truth_logp * completion_mask
    (truth_logp * weights).sum().backward()
    truth_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # float64 model: the reference backend path; the same call in float32 runs the kernels.
    logp = completion_logprobs(model, ids, mask, K, temperature=temperature, completion_mask=completion_mask)
    (logp * weights).sum().backward()
    torch.testing.assert_close(logp, truth_logp, rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, truth_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_float32_logprobs_against_float64_truth():
    model64 = _llama(tied=True).double()
    model32 = _llama(tied=True)
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    ids, mask, _ = _batch("llama")
    completion_mask = torch.rand(3, K) > 0.2
    with torch.no_grad():
        truth = completion_logprobs(model64, ids, mask, K, completion_mask=completion_mask, return_entropy=True)
        got = completion_logprobs(model32, ids, mask, K, completion_mask=completion_mask, return_entropy=True)
        heads = completion_hidden_states(model32, ids, mask, K)
        ref = reference.fused_linear_logprobs(heads.hidden, heads.weight, ids[:, L - K:], mask=completion_mask,
                                              return_entropy=True)
    for name, g, r, t in zip(("logp", "entropy"), got, ref, truth):
        assert_close_to_truth(g, r, t, torch.float32, name)


def test_bad_logits_to_keep():
    model = _llama(tied=False)
    ids, mask, _ = _batch("llama")
    with pytest.raises(ValueError, match="logits_to_keep"):
        completion_hidden_states(model, ids, mask, logits_to_keep=L)


def test_integration_registry():
    from lvrpo_fast import integrations
    from lvrpo_fast.integrations import hf

    assert integrations.load("hf") is hf
    with pytest.raises(ValueError, match="unknown integration"):
        integrations.load("deepspeed-chat")


def test_fsdp2_sharded_model_matches_unsharded(tmp_path):
    """FSDP2 on 2 gloo processes: the log-probabilities of a no-grad pass and the fused GRPO loss of a
    fully_shard-ed tiny Qwen2 give the unsharded model's, and so does every parameter's gradient (FSDP2's
    reduce-scattered mean over the ranks against the mean of the unsharded gradients on the two batches),
    judged by the three-number rule against the float64 unsharded run, wherever FSDP2 puts the LM head:
    in the root unit (untied and tied), in a unit of its own (untied), in a unit with the tied input
    embedding, in a model sharded as one unit (whose root stays gathered after the no-grad pass). The
    gathered head carries no FSDP2 hook between forward and backward; a sharded head in a model that is
    not an FSDP2 module is refused (tests/fsdp2_run.py)."""
    import fsdp2_run

    out = str(tmp_path / "fsdp2.pt")
    fsdp2_run.run(out)
    results = torch.load(out, weights_only=False)
    unsharded = {}
    for tied in (False, True):
        truth_loss, truth = fsdp2_run.unsharded(tied, torch.float64, "reference")
        ref_loss, ref = fsdp2_run.unsharded(tied, torch.float32, "reference")
        with torch.no_grad():
            logp_truth = fsdp2_run.completion_logprobs_of(fsdp2_run.build(tied).double(), 0, "reference")
            logp_ref = fsdp2_run.completion_logprobs_of(fsdp2_run.build(tied), 0, "reference")
        unsharded[tied] = truth_loss, truth, ref_loss, ref, logp_truth, logp_ref
    for wrap, tied in fsdp2_run.CASES:
        case = f"{wrap} tied={tied}"
        sharded = results[wrap, tied]
        truth_loss, truth, ref_loss, ref, logp_truth, logp_ref = unsharded[tied]
        assert sharded["sharded"], f"{case}: fully_shard left a parameter unsharded"
        assert sharded["gathered_head"] == ("Parameter", 0), f"{case}: {sharded['gathered_head']}"
        assert_close_to_truth(sharded["loss"], ref_loss, truth_loss, torch.float32, f"loss {case}")
        assert_close_to_truth(sharded["logp"], logp_ref, logp_truth, torch.float32, f"logp {case}")
        assert set(sharded["grads"]) == set(truth)
        for name, grad in truth.items():
            assert grad.abs().max() > 0, name
            assert_close_to_truth(sharded["grads"][name], ref[name], grad, torch.float32, f"{name} {case}")
    assert "fully_shard the model itself" in results["no_root_error"], results["no_root_error"]

"""Tests of lvrpo_fast.reference itself, against numbers worked out independently.

The oracle below re-derives every formula of docs/math.md with Python floats and explicit
loops (math.exp, no torch), so a mistake in the vectorized reference cannot hide behind itself.
A few cases are also checked against literal numbers computed by hand in the comments.
"""
import itertools
import math

import pytest
import torch

from lvrpo_fast import reference
from lvrpo_fast.options import LOSS_TYPES

# ------------------------------------------------------------------------------------------------
# A scalar oracle of docs/math.md sections 3 to 7
# ------------------------------------------------------------------------------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _quantile(values, q):
    """torch.quantile's default (linear interpolation between the two nearest ranks), by hand."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def oracle_loss(logp, adv, mask, logp_old=None, logp_ref=None, entropy=None, weights=None, logp_sampling=None, *,
                loss_type="grpo", epsilon_low=0.2, epsilon_high=None, delta=None, clip_ratio_c=None, beta=0.0,
                kl_estimator="k3", use_bias_correction_kl=False, importance_sampling_level="token", entropy_coef=0.0,
                max_completion_length=None, num_items_in_batch=None, sapo_temperature_pos=1.0,
                sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                vespo_lambda_neg=2.0, off_policy_mask_threshold=None, top_entropy_quantile=1.0,
                entropy_agg="loss_type"):
    """Lists of lists of floats in, (loss, metrics, per-sequence statistics as a list of dicts) out."""
    eh = epsilon_low if epsilon_high is None else epsilon_high
    B, T = len(logp), len(logp[0])
    old = logp if logp_old is None else logp_old
    sampling = old if logp_sampling is None else logp_sampling
    per_token = [[0.0] * T for _ in range(B)]
    rhos = [[0.0] * T for _ in range(B)]
    coefs = [[0.0] * T for _ in range(B)]
    kls = [[0.0] * T for _ in range(B)]
    phis = [[0.0] * T for _ in range(B)]
    kept = [[bool(mask[b][t]) for t in range(T)] for b in range(B)]
    if top_entropy_quantile < 1.0:
        live = [entropy[b][t] for b in range(B) for t in range(T) if mask[b][t]]
        threshold = _quantile(live, 1.0 - top_entropy_quantile) if live else math.inf
        kept = [[bool(mask[b][t]) and entropy[b][t] >= threshold for t in range(T)] for b in range(B)]
    seq_values = []

    def advantage(b, t):
        return adv[b][t] if isinstance(adv[b], list) else adv[b]  # per token, or the sequence's

    def vespo_phi(A, log_w):
        k, lam = (vespo_k_pos, vespo_lambda_pos) if A >= 0 else (vespo_k_neg, vespo_lambda_neg)
        lam = max(lam, 1e-4)
        try:
            return math.exp(lam + k * log_w - lam * math.exp(log_w))
        except OverflowError:
            return 0.0

    for b in range(B):
        d = [max(-20.0, min(20.0, logp[b][t] - old[b][t])) for t in range(T)]
        n = sum(mask[b])
        seq = math.exp(sum(d[t] for t in range(T) if mask[b][t]) / max(n, 1))
        log_w = sum(d[t] for t in range(T) if mask[b][t])
        if weights is not None:
            log_w += sum(max(math.log(1e-8), min(20.0, math.log(weights[b][t]))) for t in range(T) if mask[b][t])
        log_w = max(math.log(1e-8), min(20.0, log_w))
        drift = 0.0
        for t in range(T):
            if mask[b][t]:
                x = sampling[b][t] - logp[b][t]
                drift += 0.0 if math.isnan(x) else x
        drift /= max(n, 1)
        for t in range(T):
            A = advantage(b, t)
            rho = seq if importance_sampling_level == "sequence" else math.exp(d[t])
            rhos[b][t] = coefs[b][t] = rho
            if loss_type == "cispo":
                pol = -min(rho, eh) * A * logp[b][t]
            elif loss_type == "sapo":
                k = sapo_temperature_pos if A > 0 else sapo_temperature_neg
                pol = -_sigmoid(k * (rho - 1.0)) * 4.0 / k * A
            elif loss_type == "vespo":
                phis[b][t] = vespo_phi(A, log_w)
                pol = -phis[b][t] * A * logp[b][t]
            else:
                rho_c = min(max(rho, 1.0 - epsilon_low), 1.0 + eh)
                rho_1 = min(rho, delta) if delta is not None else rho
                coefs[b][t] = rho_1
                pol = -min(rho_1 * A, rho_c * A)
                if clip_ratio_c is not None and A < 0:
                    pol = min(pol, -clip_ratio_c * A)
            if off_policy_mask_threshold is not None and not (A >= 0 or drift <= off_policy_mask_threshold):
                pol = 0.0
            if not kept[b][t]:
                pol = 0.0
            if weights is not None and loss_type != "vespo":
                pol *= weights[b][t]
            L = pol
            if beta > 0:
                x = logp_ref[b][t] - logp[b][t]
                kl = {"k1": -x, "k2": 0.5 * x * x, "k3": math.exp(x) - x - 1.0}[kl_estimator]
                if use_bias_correction_kl:
                    kl *= rho
                kls[b][t] = kl
                L += beta * kl
            per_token[b][t] = L
        A = None if isinstance(adv[b], list) else adv[b]
        seq_coef = min(seq, delta) if delta is not None and loss_type not in ("cispo", "sapo", "vespo") else seq
        seq_values.append({"A": A, "coef": seq_coef, "phi": vespo_phi(A, log_w) if A is not None else 0.0})
    counts = [sum(mask[b]) for b in range(B)]
    total = sum(counts)
    n_kept = sum(kept[b][t] for b in range(B) for t in range(T))
    if loss_type in ("grpo", "sapo"):
        weight = [1.0 / (B * max(c, 1)) for c in counts]
    elif loss_type == "bnpo":
        weight = [1.0 / max(total, 1)] * B
    elif loss_type == "dr_grpo":
        weight = [1.0 / (B * max_completion_length)] * B
    elif loss_type in ("dapo", "cispo", "vespo"):
        weight = [1.0 / (num_items_in_batch if num_items_in_batch is not None else max(total, 1))] * B
    else:
        weight = [1.0 / B] * B
    sums = [sum(per_token[b][t] for t in range(T) if mask[b][t]) for b in range(B)]
    kept_entropy = [sum(entropy[b][t] for t in range(T) if kept[b][t]) if entropy is not None else 0.0
                    for b in range(B)]
    loss = sum(w * s for w, s in zip(weight, sums))
    if entropy_coef:
        bonus_weight = weight if entropy_agg == "loss_type" else [1.0 / max(n_kept, 1)] * B
        loss -= entropy_coef * sum(w * e for w, e in zip(bonus_weight, kept_entropy))

    def mean(f):
        return sum(f(b, t) for b in range(B) for t in range(T) if mask[b][t]) / max(total, 1)

    high_bound = eh if loss_type == "cispo" else 1.0 + eh
    low = lambda b, t: float(coefs[b][t] < 1.0 - epsilon_low and advantage(b, t) < 0)  # noqa: E731
    high = lambda b, t: float(coefs[b][t] > high_bound and advantage(b, t) > 0)  # noqa: E731
    metrics = {
        "clip_ratio_low": mean(low),
        "clip_ratio_high": mean(high),
        "clip_ratio_region": mean(lambda b, t: max(low(b, t), high(b, t))),
        "ratio": mean(lambda b, t: rhos[b][t]),
    }
    if beta > 0:
        metrics["kl"] = mean(lambda b, t: kls[b][t])
    if entropy is not None:
        metrics["entropy"] = mean(lambda b, t: entropy[b][t])

    def row_sum(f, b):
        return sum(f(b, t) for t in range(T) if mask[b][t])

    stats = []
    for b in range(B):
        sv = seq_values[b]
        sequence_values = sv["A"] is not None and importance_sampling_level == "sequence"
        stats.append({
            "loss": weight[b] * sums[b], "count": counts[b], "kl": row_sum(lambda b, t: kls[b][t], b),
            "clip_low": row_sum(low, b), "clip_high": row_sum(high, b),
            "clip_region": row_sum(lambda b, t: max(low(b, t), high(b, t)), b),
            "ratio": row_sum(lambda b, t: rhos[b][t], b),
            "entropy": row_sum(lambda b, t: entropy[b][t], b) if entropy is not None else 0.0,
            "kept": sum(kept[b]), "entropy_kept": kept_entropy[b],
            "seq_clip_low": float(sequence_values and sv["coef"] < 1.0 - epsilon_low and sv["A"] < 0),
            "seq_clip_high": float(sequence_values and sv["coef"] > high_bound and sv["A"] > 0),
            "seq_weight": sv["phi"] if loss_type == "vespo" else 0.0,
            "weight": row_sum(lambda b, t: phis[b][t], b),
        })
    return loss, metrics, stats


def _random_batch(B=4, T=5, fully_masked_row=False):
    logp = -torch.rand(B, T, dtype=torch.float64) * 3 - 0.05
    logp_old = logp + torch.randn(B, T, dtype=torch.float64) * 0.3
    logp_ref = logp + torch.randn(B, T, dtype=torch.float64) * 0.3
    entropy = torch.rand(B, T, dtype=torch.float64) * 2
    adv = torch.randn(B, dtype=torch.float64)
    mask = torch.rand(B, T) > 0.25
    mask[:, 0] = True
    if fully_masked_row:
        mask[1] = False
    weights = torch.rand(B, T, dtype=torch.float64) + 0.5
    return logp, logp_old, logp_ref, entropy, adv, mask, weights


OPTION_SETS = [
    {},
    {"epsilon_low": 0.1, "epsilon_high": 0.28},
    {"delta": 1.3},
    {"delta": 1.0},
    {"epsilon_low": 1.0},
    {"clip_ratio_c": 2.0},
    {"beta": 0.1, "kl_estimator": "k1"},
    {"beta": 0.1, "kl_estimator": "k2"},
    {"beta": 0.1, "kl_estimator": "k3"},
    {"beta": 0.05, "use_bias_correction_kl": True},
    {"entropy_coef": 0.01},
    {"entropy_coef": 0.01, "entropy_agg": "token_mean"},
    {"rollout": True},
    {"off_policy_mask_threshold": 0.05, "sampling": True},
    {"top_entropy_quantile": 0.5},
    {"vespo_k_pos": 1.5, "vespo_lambda_pos": 0.0, "vespo_k_neg": 2.5, "vespo_lambda_neg": 4.0, "rollout": True},
    {"beta": 0.04, "delta": 1.5, "clip_ratio_c": 3.0, "entropy_coef": 0.02, "rollout": True,
     "use_bias_correction_kl": True, "off_policy_mask_threshold": 0.0, "top_entropy_quantile": 0.25,
     "entropy_agg": "token_mean"},
]


def _cases():
    for loss_type, level, opts in itertools.product(LOSS_TYPES, ("token", "sequence"), OPTION_SETS):
        if any(k.startswith("vespo") for k in opts) and loss_type != "vespo":
            continue
        yield loss_type, level, opts


@pytest.mark.parametrize("per_token", [False, True], ids=["adv-per-sequence", "adv-per-token"])
@pytest.mark.parametrize("loss_type,level,opts", list(_cases()))
def test_grpo_loss_matches_scalar_oracle(loss_type, level, opts, per_token):
    logp, logp_old, logp_ref, entropy, adv, mask, weights = _random_batch(fully_masked_row=True)
    if per_token:
        adv = torch.randn(logp.shape, dtype=logp.dtype)
    opts = dict(opts)
    use_weights = opts.pop("rollout", False)
    sampling = logp + torch.randn(logp.shape, dtype=logp.dtype) * 0.3 if opts.pop("sampling", False) else None
    extra = {"importance_sampling_level": level, "loss_type": loss_type, **opts}
    if loss_type == "dr_grpo":
        extra["max_completion_length"] = 7
    if loss_type == "cispo":
        extra["epsilon_high"] = 1.1
    loss, metrics, stats = reference.grpo_loss(
        logp, adv, mask, logp_old=logp_old, logp_ref=logp_ref, logp_sampling=sampling, entropy=entropy,
        rollout_weights=weights if use_weights else None, return_sequence_stats=True, **extra)
    want_loss, want_metrics, want_stats = oracle_loss(
        logp.tolist(), adv.tolist(), mask.tolist(), logp_old.tolist(), logp_ref.tolist(), entropy.tolist(),
        weights.tolist() if use_weights else None, None if sampling is None else sampling.tolist(), **extra)
    assert loss.item() == pytest.approx(want_loss, rel=1e-12, abs=1e-12)
    assert set(metrics) == set(want_metrics)
    for key, value in want_metrics.items():
        assert metrics[key].item() == pytest.approx(value, rel=1e-6, abs=1e-7), key
    for b, row in enumerate(want_stats):
        for key, value in row.items():
            assert getattr(stats, key)[b].item() == pytest.approx(value, rel=1e-12, abs=1e-12), (b, key)


def test_hand_computed_clip_case():
    # One sequence, two tokens, A = 1, epsilon 0.2.
    # token 0: logp - logp_old = log(1.5): rho = 1.5, clipped to 1.2: L = -min(1.5, 1.2) = -1.2
    # token 1: rho = 0.5, clipped to 0.8: L = -min(0.5, 0.8) = -0.5
    # grpo: mean over the two tokens = -0.85; clip_ratio_high = 1/2 (rho > 1.2 with A > 0), low = 0 (A > 0)
    logp = torch.tensor([[math.log(0.3), math.log(0.2)]], dtype=torch.float64)
    old = torch.tensor([[math.log(0.2), math.log(0.4)]], dtype=torch.float64)
    loss, metrics = reference.grpo_loss(logp, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2),
                                        logp_old=old)
    assert loss.item() == pytest.approx(-0.85, abs=1e-12)
    assert metrics["clip_ratio_high"].item() == pytest.approx(0.5)
    assert metrics["clip_ratio_low"].item() == 0.0
    assert metrics["ratio"].item() == pytest.approx(1.0)


def test_hand_computed_negative_advantage_dual_clip():
    # A = -1, rho = 5: L = -min(5 * -1, 1.2 * -1) = 5; dual clip c = 3 caps it at -c A = 3.
    logp = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    old = torch.tensor([[math.log(0.1)]], dtype=torch.float64)
    adv = torch.tensor([-1.0], dtype=torch.float64)
    loss, _ = reference.grpo_loss(logp, adv, torch.ones(1, 1), logp_old=old)
    assert loss.item() == pytest.approx(5.0, rel=1e-12)
    loss, _ = reference.grpo_loss(logp, adv, torch.ones(1, 1), logp_old=old, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(3.0, rel=1e-12)


def test_hand_computed_kl_estimators():
    # logp = log 0.5, logp_ref = log 0.25: x = -log 2.
    # k1 = log 2, k2 = (log 2)^2 / 2, k3 = 1/2 + log 2 - 1; with A = 0 the loss is beta * KL.
    logp = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25)]], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    l2 = math.log(2.0)
    for est, want in (("k1", l2), ("k2", 0.5 * l2 * l2), ("k3", 0.5 + l2 - 1.0)):
        loss, metrics = reference.grpo_loss(logp, zero, torch.ones(1, 1), logp_ref=ref, beta=1.0, kl_estimator=est)
        assert loss.item() == pytest.approx(want, rel=1e-12), est
        assert metrics["kl"].item() == pytest.approx(want, rel=1e-6), est


def test_hand_computed_aggregations():
    # Per-token losses with rho = 1 and A = [1, 2] are -A: row 0 has 1 token, row 1 has 3 tokens.
    logp = torch.full((2, 3), -1.0, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, 2.0], dtype=torch.float64)
    want = {
        "grpo": (-1.0 + -2.0) / 2,                  # mean of per-sequence means
        "bnpo": (-1.0 - 6.0) / 4,                   # token mean
        "dr_grpo": (-1.0 - 6.0) / (2 * 5),          # B * max_completion_length
        "dapo": (-1.0 - 6.0) / 4,
        "seq_mean_token_sum": (-1.0 - 6.0) / 2,
        "luspo": (-1.0 - 6.0) / 2,
    }
    for loss_type, value in want.items():
        loss, _ = reference.grpo_loss(logp, adv, mask, loss_type=loss_type, max_completion_length=5)
        assert loss.item() == pytest.approx(value, rel=1e-12), loss_type
    loss, _ = reference.grpo_loss(logp, adv, mask, loss_type="dapo", num_items_in_batch=10)
    assert loss.item() == pytest.approx(-0.7, rel=1e-12)


def test_hand_computed_sapo_and_cispo():
    # rho = 1: sapo gate sigmoid(0) * 4 / k = 2 / k; A = 1 uses k = 1 -> L = -2; A = -1 uses k = 1.05 -> 2/1.05
    logp = torch.full((2, 1), -0.7, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, _ = reference.grpo_loss(logp, adv, torch.ones(2, 1), loss_type="sapo")
    assert loss.item() == pytest.approx((-2.0 + 2.0 / 1.05) / 2, rel=1e-12)
    # cispo with rho = 1 under a cap of 5: L = -A * logp = 0.7 and -0.7, token mean 0
    loss, _ = reference.grpo_loss(logp, adv, torch.ones(2, 1), loss_type="cispo", epsilon_high=5.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-15)
    # gradient of cispo w.r.t. logp is -min(rho, cap) * A / count (the weight is detached)
    lp = logp.clone().requires_grad_(True)
    loss, _ = reference.grpo_loss(lp, adv, torch.ones(2, 1), loss_type="cispo", epsilon_high=5.0)
    loss.backward()
    assert lp.grad.flatten().tolist() == pytest.approx([-0.5, 0.5], rel=1e-12)


def test_hand_computed_vespo():
    # One sequence of two tokens, logp - logp_old = (0.1, 0.2): log w = 0.3 (the sum, not the mean),
    # w = e^0.3. A = 1 takes k = 2, lambda = 3: phi = exp(3 + 2 * 0.3 - 3 e^0.3) = exp(3.6 - 4.04957...)
    # = 0.63790. dapo's token mean: L = -phi * A * (logp_0 + logp_1) / 2 with logp = (-1, -2): 1.5 phi.
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    old = logp - torch.tensor([[0.1, 0.2]], dtype=torch.float64)
    phi = math.exp(3.0 + 0.6 - 3.0 * math.exp(0.3))
    assert phi == pytest.approx(0.63790, abs=1e-5)
    loss, _, stats = reference.grpo_loss(logp, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2),
                                         logp_old=old, loss_type="vespo", return_sequence_stats=True)
    assert loss.item() == pytest.approx(1.5 * phi, rel=1e-12)
    assert stats.seq_weight.item() == pytest.approx(phi, rel=1e-12)
    # A = -1 takes k = 3, lambda = 2: phi = exp(2 + 0.9 - 2 e^0.3); the rollout weights (e^-0.5, 1) add
    # their logs to log w: log w = -0.2.
    weights = torch.tensor([[math.exp(-0.5), 1.0]], dtype=torch.float64)
    loss, _, stats = reference.grpo_loss(logp, torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 2),
                                         logp_old=old, loss_type="vespo", rollout_weights=weights,
                                         return_sequence_stats=True)
    phi = math.exp(2.0 - 0.6 - 2.0 * math.exp(-0.2))
    assert loss.item() == pytest.approx(-1.5 * phi, rel=1e-12)


def test_hand_computed_masks():
    # Two sequences, A = (-1, -1), rho = 1. Sequence 0's sampler is 0.1 above logp on average, sequence
    # 1's 0.3: with threshold 0.2 only sequence 1 is dropped (A < 0 and drift > 0.2). grpo: the policy
    # term is -A = 1 per kept token, so the loss is (1 + 0) / 2.
    logp = torch.full((2, 2), -1.0, dtype=torch.float64)
    sampling = logp + torch.tensor([[0.0, 0.2], [0.3, 0.3]], dtype=torch.float64)
    adv = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    loss, _ = reference.grpo_loss(logp, adv, torch.ones(2, 2), logp_sampling=sampling, off_policy_mask_threshold=0.2)
    assert loss.item() == pytest.approx(0.5, rel=1e-12)
    # A >= 0 is never dropped
    loss, _ = reference.grpo_loss(logp, -adv, torch.ones(2, 2), logp_sampling=sampling, off_policy_mask_threshold=0.2)
    assert loss.item() == pytest.approx(-1.0, rel=1e-12)
    # High-entropy mask: entropies (1, 2, 3, 4), top_entropy_quantile 0.5: threshold = quantile 0.5 = 2.5,
    # tokens 3 and 4 kept. grpo: sequence 0 keeps nothing (0), sequence 1 keeps both (-A = 1): loss 1/2.
    # The token-mean bonus: -0.1 * (3 + 4) / 2 = -0.35, whatever the loss type.
    entropy = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    loss, _, stats = reference.grpo_loss(logp, adv, torch.ones(2, 2), entropy=entropy, top_entropy_quantile=0.5,
                                         entropy_coef=0.1, entropy_agg="token_mean", return_sequence_stats=True)
    assert loss.item() == pytest.approx(0.5 - 0.35, rel=1e-12)
    assert stats.kept.tolist() == [0.0, 2.0] and stats.entropy_kept.tolist() == [0.0, 7.0]


# ------------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# ------------------------------------------------------------------------------------------------


def test_logprobs_hand_computed():
    # Two classes, logits (0, log 3): p = (1/4, 3/4). logp of class 1 = log 0.75;
    # entropy = -(1/4 log 1/4 + 3/4 log 3/4).
    hidden = torch.tensor([[1.0]], dtype=torch.float64)
    weight = torch.tensor([[0.0], [math.log(3.0)]], dtype=torch.float64)
    logp, ent = reference.fused_linear_logprobs(hidden, weight, torch.tensor([1]), return_entropy=True)
    assert logp.item() == pytest.approx(math.log(0.75), rel=1e-12)
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-12)
    # temperature 2 halves the logits: p = (1, sqrt 3) / (1 + sqrt 3)
    logp = reference.fused_linear_logprobs(hidden, weight, torch.tensor([0]), temperature=2.0)
    assert logp.item() == pytest.approx(-math.log(1.0 + math.sqrt(3.0)), rel=1e-12)
    # bias shifts the logits before the temperature
    bias = torch.tensor([math.log(3.0), 0.0], dtype=torch.float64)
    logp = reference.fused_linear_logprobs(hidden, weight, torch.tensor([0]), bias=bias)
    assert logp.item() == pytest.approx(math.log(0.5), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_logprobs_properties(dtype):
    hidden = torch.randn(3, 7, 19, dtype=dtype) * 4
    weight = torch.randn(101, 19, dtype=dtype)
    targets = torch.randint(0, 101, (3, 7))
    logp, ent = reference.fused_linear_logprobs(hidden, weight, targets, return_entropy=True)
    assert logp.shape == targets.shape and ent.shape == targets.shape
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (logp <= 0).all()
    assert (ent >= -1e-6).all() and (ent <= math.log(101) + 1e-5).all()


def test_logprobs_extreme_and_negative_logits():
    hidden = torch.tensor([[1.0], [-1.0]], dtype=torch.float32)
    weight = torch.tensor([[1e4], [-1e4], [0.0]], dtype=torch.float32)
    logp, ent = reference.fused_linear_logprobs(hidden, weight, torch.tensor([0, 0]), return_entropy=True)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert logp[0].item() == 0.0 and logp[1].item() == pytest.approx(-2e4)
    # all logits negative: the log-sum-exp is still right (lse = -50 + log 5 = -48.39, whose fp32
    # spacing is 3.8e-6, so the difference z - lse is exact only to a few ulps of 48)
    weight = torch.full((5, 1), -50.0)
    logp = reference.fused_linear_logprobs(torch.ones(1, 1), weight, torch.tensor([2]))
    assert logp.item() == pytest.approx(-math.log(5.0), abs=1e-5)


def test_logprobs_mask_zeroes_outputs_and_gradients():
    hidden = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 3))
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    targets[~mask] = 999  # out of range where masked: allowed
    logp, ent = reference.fused_linear_logprobs(hidden, weight, targets, mask=mask, return_entropy=True)
    assert (logp[~mask] == 0).all() and (ent[~mask] == 0).all()
    (logp.sum() + ent.sum()).backward()
    assert (hidden.grad[~mask] == 0).all()


def test_gradcheck_logprobs():
    hidden = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (5,))

    def f(h, w, b):
        lp, ent = reference.fused_linear_logprobs(h, w, targets, bias=b, temperature=0.7, return_entropy=True)
        return lp, ent

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


# vespo's weight is a stop-gradient function of logp itself, which finite differences would see:
# its gradient (-phi A) is checked against the kernels and its value against the scalar oracle.
@pytest.mark.parametrize("loss_type,level", [(lt, lv) for lt in LOSS_TYPES for lv in ("token", "sequence")
                                              if lt != "vespo"])
@pytest.mark.parametrize("masks", [False, True], ids=["plain", "masked"])
def test_gradcheck_grpo_loss(loss_type, level, masks):
    logp, logp_old, logp_ref, entropy, adv, mask, weights = _random_batch(B=3, T=4)
    logp.requires_grad_(True)
    entropy.requires_grad_(True)
    opts = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.1, use_bias_correction_kl=True,
                entropy_coef=0.05, delta=2.5, clip_ratio_c=3.0, max_completion_length=6)
    if masks:  # the masks are constants of the loss: finite differences must not move them
        sampling = logp.detach() + 0.3 * torch.randn(logp.shape, dtype=logp.dtype)
        opts.update(off_policy_mask_threshold=0.0, top_entropy_quantile=0.5, entropy_agg="token_mean",
                    logp_sampling=sampling)
        entropy = entropy.detach() + 0.5 * torch.arange(12, dtype=entropy.dtype).view(3, 4)  # far apart
        entropy.requires_grad_(True)

    def f(lp, ent):
        return reference.grpo_loss(lp, adv, mask, logp_old=logp_old, logp_ref=logp_ref, entropy=ent,
                                   rollout_weights=weights, **opts)[0]

    assert torch.autograd.gradcheck(f, (logp, entropy))


def test_gradcheck_fused_linear_grpo_loss():
    B, T, D, V = 2, 3, 5, 9
    hidden = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    adv = torch.randn(B, dtype=torch.float64)
    with torch.no_grad():
        current = reference.fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=0.9)
    ref = current + 0.3 * torch.randn(B, T, dtype=torch.float64)
    # A fixed logp_old: with the default logp.detach() the forward value does not move with logp
    # (ratio 1) while the gradient does, by design, and finite differences cannot see that.
    old = current + 0.1 * torch.randn(B, T, dtype=torch.float64)

    def f(h, w, b):
        return reference.fused_linear_grpo_loss(h, w, targets, mask, adv, bias=b, logp_ref=ref, logp_old=old,
                                                beta=0.1, temperature=0.9, entropy_coef=0.01)[0]

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


# ------------------------------------------------------------------------------------------------
# Advantages
# ------------------------------------------------------------------------------------------------


def test_advantages_hand_computed():
    # group (1, 3): mean 2, unbiased std sqrt(2): A = (-1, 1) / (sqrt 2 + eps)
    r = torch.tensor([1.0, 3.0, 0.0, 0.0], dtype=torch.float64)
    a = reference.group_advantages(r, 2, eps=0.0)
    s = math.sqrt(2.0)
    assert a.tolist() == pytest.approx([-1 / s, 1 / s, 0.0, 0.0], rel=1e-12)
    # batch scale: the std of (1, 3, 0, 0) is sqrt(11/4 - ... ) computed by hand: mean 1, sum sq dev = 0+4+1+1 = 6
    a = reference.group_advantages(r, 2, scale="batch", eps=0.0)
    assert a.tolist() == pytest.approx([-1 / math.sqrt(2.0), 1 / math.sqrt(2.0), 0.0, 0.0], rel=1e-12)
    a = reference.group_advantages(r, 2, scale="none")
    assert a.tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0], rel=1e-12)
    # leave-one-out with G = 3, rewards (0, 0, 3): baselines (1.5, 1.5, 0): A = (-1.5, -1.5, 3)
    a = reference.group_advantages(torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64), 3, scale="none",
                                   leave_one_out=True)
    assert a.tolist() == pytest.approx([-1.5, -1.5, 3.0], rel=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_advantages_equal_rewards_are_zero(scale, eps):
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=torch.float32)
    a = reference.group_advantages(r, 3, scale=scale, eps=eps)
    assert torch.equal(a, torch.zeros(6))


def test_advantages_sum_to_zero_per_group():
    r = torch.rand(35, dtype=torch.float64)
    for loo in (False, True):
        a = reference.group_advantages(r, 5, leave_one_out=loo).view(7, 5)
        assert torch.allclose(a.sum(1), torch.zeros(7, dtype=torch.float64), atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Edge cases of the spec
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_mask_gives_zero_loss_and_gradient(loss_type):
    logp = (-torch.rand(3, 4, dtype=torch.float64)).requires_grad_(True)
    loss, metrics = reference.grpo_loss(logp, torch.randn(3, dtype=torch.float64), torch.zeros(3, 4),
                                        loss_type=loss_type, max_completion_length=4)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert torch.equal(logp.grad, torch.zeros_like(logp))
    assert all(torch.isfinite(v) for v in metrics.values())


def test_t_equals_one_and_g_equals_two():
    logp = -torch.rand(4, 1, dtype=torch.float64)
    adv = reference.group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=torch.float64), 2)
    assert adv[2:].tolist() == [0.0, 0.0]
    loss, _ = reference.grpo_loss(logp, adv, torch.ones(4, 1), importance_sampling_level="sequence")
    want, _, _ = oracle_loss(logp.tolist(), adv.tolist(), [[1]] * 4, importance_sampling_level="sequence")
    assert loss.item() == pytest.approx(want, rel=1e-12)


def test_nonfinite_input_is_not_silently_finite():
    logp = torch.tensor([[-0.5, float("nan")]], dtype=torch.float64)
    loss, _ = reference.grpo_loss(logp, torch.ones(1, dtype=torch.float64), torch.ones(1, 2))
    assert not torch.isfinite(loss)
    hidden = torch.tensor([[float("inf"), 1.0]])
    logp = reference.fused_linear_logprobs(hidden, torch.randn(5, 2), torch.tensor([1]))
    assert not torch.isfinite(logp).all()

"""process_advantages on every backend against the float64 reference and a hand-computed case
(docs/math.md section 11)."""
import pytest
import torch

import lvrpo_fast
from lvrpo_fast import dispatch, reference
from tolerances import assert_close_to_truth

SCALES = ("group", "batch", "none")
BACKENDS = ("reference", "triton", "cpp")
# (group size G, prompts P, completion positions T): odd sizes, T = 1 (one token, at most one step),
# T past one token block of the Triton kernel (1024) so that a sequence spans two.
SHAPES = ((2, 7, 1), (3, 5, 7), (5, 3, 37), (4, 2, 1030))


def _backend(name):
    """(name, device) of a backend that runs here, else skip with the reason."""
    dev = torch.device("cuda" if name == "triton" and torch.cuda.is_available() else "cpu")
    module, why = dispatch.usable(name, dev, torch.float32)
    if module is None:
        pytest.skip(f"{name} backend unavailable on {dev}: {why}")
    return name, dev


@pytest.fixture(params=BACKENDS)
def backend(request):
    return _backend(request.param)


def packed_steps(prompts, group_size, T, device, max_steps=4, kind="gaussian"):
    """Fresh packed steps: each sequence 0..min(T, max_steps) steps ending at random distinct tokens.
    Group 0's step rewards are all equal, group 1 (when there are 3 groups or more) holds one step only,
    the other groups at least two. Returns (step_rewards [S], step_ends [S] int64, step_offsets [B + 1] int64)."""
    B = prompts * group_size
    counts = torch.randint(0, min(T, max_steps) + 1, (B,))
    if prompts >= 3:
        counts[group_size:2 * group_size] = 0
        counts[group_size + int(torch.randint(group_size, ()))] = 1
    special = 2 if prompts >= 3 else 1  # groups 0 (equal) and 1 (one step), when there are three or more
    for g in range(special, prompts):  # two steps at least, so that the group's rewards can differ
        if int(counts[g * group_size:(g + 1) * group_size].sum()) < 2:
            counts[g * group_size:g * group_size + 2].clamp_(min=1)
    for g in range(special):
        if int(counts[g * group_size:(g + 1) * group_size].sum()) == 0:
            counts[g * group_size + int(torch.randint(group_size, ()))] = 1
    ends = [torch.randperm(T)[:int(k)].sort().values for k in counts]
    step_ends = torch.cat(ends) if ends else torch.zeros(0, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    S = int(offsets[-1])
    if kind == "binary":  # a verifier's 0/1 step judgments: ties everywhere
        rewards = torch.randint(0, 2, (S,)).float()
    else:
        rewards = torch.randn(S) * 2.0 + 0.5
    rewards[:int(offsets[group_size])] = 0.75
    return rewards.to(device), step_ends.to(device), offsets.to(device)


def _check(name, device, rewards, ends, offsets, group_size, T, **kwargs):
    """The backend's result against the reference at float32 and the float64 truth; returns it."""
    out = lvrpo_fast.process_advantages(rewards, ends, offsets, group_size, T, backend=name, **kwargs)
    ref = reference.process_advantages(rewards, ends, offsets, group_size, T, **kwargs)
    double = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    truth = reference.process_advantages(rewards.double(), ends, offsets, group_size, T, **double)
    B = offsets.shape[0] - 1
    assert out.dtype == torch.float32 and out.shape == (B, T) and out.device == rewards.device
    assert_close_to_truth(out, ref, truth, torch.float32, name=f"process advantages {kwargs}")
    return out


def _after_last_step(ends, offsets, T):
    """[B, T] bool: the tokens after each sequence's last step (all of them for a sequence without one)."""
    B = offsets.shape[0] - 1
    last = torch.full((B,), -1, dtype=torch.int64)
    counts = (offsets[1:] - offsets[:-1]).cpu()
    has = counts > 0
    last[has] = ends.cpu()[offsets[1:].cpu()[has] - 1]
    return torch.arange(T).unsqueeze(0) > last.unsqueeze(1)


@pytest.mark.parametrize("eps", [0.0, 0.5])
@pytest.mark.parametrize("leave_one_out", [False, True])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("group_size,prompts,T", SHAPES)
def test_matches_reference(backend, group_size, prompts, T, scale, leave_one_out, eps):
    name, device = backend
    rewards, ends, offsets = packed_steps(prompts, group_size, T, device)
    out = _check(name, device, rewards, ends, offsets, group_size, T, scale=scale, eps=eps,
                 leave_one_out=leave_one_out).cpu()
    # Exactly 0, not merely close: the equal group 0, the one-step group 1, every token after a last step.
    assert out[:group_size].eq(0).all()
    if prompts >= 3:
        assert out[group_size:2 * group_size].eq(0).all()
    assert out[_after_last_step(ends, offsets, T)].eq(0).all()
    assert out[(2 if prompts >= 3 else 1) * group_size:].ne(0).any()  # the other groups carry signal


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("group_size,prompts,T", SHAPES[:3])
def test_binary_step_rewards(backend, group_size, prompts, T, scale):
    name, device = backend
    for leave_one_out in (False, True):
        _check(name, device, *packed_steps(prompts, group_size, T, device, kind="binary"), group_size, T,
               scale=scale, eps=0.0, leave_one_out=leave_one_out)


def test_hand_computed(backend):
    """Two groups of two sequences, eight tokens, eps = 0 (docs/math.md section 11 by hand).

    Group 0: sequence 0 has steps (reward 1, ends at 2) and (0, ends at 5), sequence 1 one step (0.5, 1):
    mean 0.5, std 0.5, normalized 1, -1, 0. Group 1: sequence 2 has (1, 3) and (0, 6), sequence 3 (2, 4):
    mean 1, std 1, normalized 0, -1, 1."""
    name, device = backend
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 2.0], device=device)
    ends = torch.tensor([2, 5, 1, 3, 6, 4], device=device)
    offsets = torch.tensor([0, 2, 3, 5, 6], device=device)

    def run(**kwargs):
        return lvrpo_fast.process_advantages(rewards, ends, offsets, 2, 8, eps=0.0, backend=name, **kwargs).cpu()

    expected = torch.tensor([
        [0, 0, 0, -1, -1, -1, 0, 0],      # 1 + (-1) up to token 2, then -1 up to token 5, then nothing
        [0, 0, 0, 0, 0, 0, 0, 0],         # its one step is the group's mean
        [-1, -1, -1, -1, -1, -1, -1, 0],  # 0 + (-1) up to token 3, -1 up to token 6
        [1, 1, 1, 1, 1, 0, 0, 0],
    ], dtype=torch.float32)
    assert torch.equal(run(), expected)
    # scale="none": only the mean is subtracted, group 0's deviations are +-0.5, group 1's +-1.
    assert torch.equal(run(scale="none"), expected * torch.tensor([[0.5], [0.5], [1.0], [1.0]]))
    # leave-one-out over S_g = 3 steps: (r - mu) times 3 / 2. The kernels form it as (r - mu) * S / (S - 1)
    # after a float32 mean and sum, so the result may differ from expected * 1.5 in the last ulp or two.
    torch.testing.assert_close(run(leave_one_out=True), expected * 1.5, rtol=1e-6, atol=0)
    # Hybrid: (1 - w) A_process + w a at every token, after the last step too (a fused multiply-add in the
    # kernels against two rounded products here: an ulp or two).
    outcome = torch.tensor([0.5, -0.5, 2.0, -2.0], device=device)
    mixed = run(outcome_advantages=outcome, outcome_weight=0.25)
    torch.testing.assert_close(mixed, 0.75 * expected + 0.25 * outcome.cpu().unsqueeze(1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("leave_one_out", [False, True])
@pytest.mark.parametrize("scale", SCALES)
def test_one_step_at_the_end_is_group_advantages(backend, scale, leave_one_out):
    """One step per sequence, ending at its last token, rewarded with the outcome reward: every token up to
    that end gets the sequence's group advantage (section 2), the tokens after it 0."""
    name, device = backend
    G, P, T = 3, 5, 11
    rewards = torch.randn(P * G) + 0.5
    rewards[:G] = 0.25
    ends = torch.randint(0, T, (P * G,))
    offsets = torch.arange(P * G + 1)
    out = _check(name, device, rewards.to(device), ends.to(device), offsets.to(device), G, T, scale=scale,
                 eps=1e-4, leave_one_out=leave_one_out).cpu()
    truth = reference.group_advantages(rewards.double(), G, scale=scale, leave_one_out=leave_one_out)
    upto = torch.arange(T).unsqueeze(0) <= ends.unsqueeze(1)
    expected = torch.where(upto, truth.unsqueeze(1), torch.zeros((), dtype=torch.float64))
    assert_close_to_truth(out, None, expected, torch.float32, name="one step = group advantages")


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_hybrid_with_outcome(backend, weight):
    name, device = backend
    G, P, T = 3, 4, 13
    rewards, ends, offsets = packed_steps(P, G, T, device)
    outcome = torch.randn(P * G, device=device)
    out = _check(name, device, rewards, ends, offsets, G, T, outcome_advantages=outcome, outcome_weight=weight)
    if weight == 1.0:  # (1 - 1) * finite + 1 * a is a, bit for bit
        assert torch.equal(out, outcome.unsqueeze(1).expand(-1, T))


def test_nan_step_reward_reaches_its_group(backend):
    """A NaN step reward makes its group's steps NaN (never a number); other groups stay finite."""
    name, device = backend
    G, P, T = 2, 4, 9
    rewards, ends, offsets = packed_steps(P, G, T, device)
    first = int(offsets[2 * G])  # the first step of group 2
    rewards[first] = float("nan")
    out = _check(name, device, rewards, ends, offsets, G, T).cpu()
    group2 = out[2 * G:3 * G]
    assert group2[~_after_last_step(ends, offsets, T)[2 * G:3 * G]].isnan().all()
    others = torch.cat([out[:2 * G], out[3 * G:]])
    assert torch.isfinite(others).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_step_rewards(backend, dtype):
    name, device = backend
    if not dispatch.usable(name, device, dtype)[0]:
        pytest.skip(f"{name} does not take {dtype}")
    rewards, ends, offsets = packed_steps(4, 3, 10, device)
    # Every backend computes in float32 from the exactly representable low-precision rewards.
    _check(name, device, rewards.to(dtype), ends, offsets, 3, 10, scale="group")


def test_int32_indices_and_non_contiguous_rewards(backend):
    name, device = backend
    rewards, ends, offsets = packed_steps(3, 4, 15, device)
    strided = rewards.repeat_interleave(2)[::2]
    assert not strided.is_contiguous()
    _check(name, device, strided, ends.int(), offsets.int(), 4, 15, scale="batch", leave_one_out=True)


def test_float64_keeps_float64():
    rewards, ends, offsets = packed_steps(2, 2, 5, "cpu")
    out = lvrpo_fast.process_advantages(rewards.double(), ends, offsets, 2, 5)
    assert out.dtype == torch.float64


def test_empty_batch(backend):
    name, device = backend
    out = lvrpo_fast.process_advantages(torch.zeros(0, device=device), torch.zeros(0, dtype=torch.int64, device=device),
                                        torch.zeros(1, dtype=torch.int64, device=device), 2, 6, backend=name)
    assert out.shape == (0, 6) and out.dtype == torch.float32


def test_triton_multi_block_and_every_element_written(monkeypatch):
    """Groups longer than one step block and sequences longer than one token block (ragged last blocks),
    on an output poisoned with NaN before the kernels write it."""
    name, device = _backend("triton")
    from lvrpo_fast.kernels import autotune
    from lvrpo_fast.kernels import process_advantages as kernel

    monkeypatch.setattr(autotune, "PROCESS_ADVANTAGES_BLOCK_STEPS", 2)
    monkeypatch.setattr(autotune, "PROCESS_ADVANTAGES_MAX_BLOCK_T", 4)
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(kernel.torch, "empty", poisoned)
    rewards, ends, offsets = packed_steps(3, 5, 11, device, max_steps=5)
    for scale in SCALES:
        _check(name, device, rewards, ends, offsets, 5, 11, scale=scale, eps=0.0, leave_one_out=scale == "none")
    _check(name, device, rewards, ends, offsets, 5, 11, outcome_advantages=torch.randn(15, device=device),
           outcome_weight=0.5)


def _valid(device):
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 2.0], device=device)
    ends = torch.tensor([2, 5, 1, 3, 6, 4], device=device)
    offsets = torch.tensor([0, 2, 3, 5, 6], device=device)
    return rewards, ends, offsets


@pytest.mark.parametrize("case,match", [
    ("end past T", r"step_ends must lie in \[0, seq_len=8\).*step_ends\[4\] = 8 \(sequence 2\)"),
    ("negative end", r"step_ends must lie in \[0, seq_len=8\).*step_ends\[0\] = -1 \(sequence 0\)"),
    ("unsorted ends", r"increase strictly within each sequence: sequence 0 has step_ends\[0\] = 5 then "
                      r"step_ends\[1\] = 2"),
    ("repeated end", r"increase strictly.*sequence 2 has step_ends\[3\] = 3 then step_ends\[4\] = 3"),
    ("group without steps", r"group 1 \(sequences 2 to 3\) has no step"),
    ("offsets decrease", r"step_offsets must be non-decreasing: step_offsets\[1\] = 4 > step_offsets\[2\] = 3"),
    ("offsets start", r"step_offsets\[0\] must be 0.*got 1"),
    ("offsets end", r"step_offsets\[B\] = step_offsets\[4\] must equal the number of steps S = 6.*got 5"),
])
def test_bad_packing_names_the_argument(backend, case, match):
    name, device = backend
    rewards, ends, offsets = _valid(device)
    if case == "end past T":
        ends[4] = 8
    elif case == "negative end":
        ends[0] = -1
    elif case == "unsorted ends":
        ends[0], ends[1] = 5, 2
    elif case == "repeated end":
        ends[4] = 3
    elif case == "group without steps":
        rewards, ends, offsets = rewards[:3], ends[:3], torch.tensor([0, 2, 3, 3, 3], device=device)
    elif case == "offsets decrease":
        offsets = torch.tensor([0, 4, 3, 5, 6], device=device)
    elif case == "offsets start":
        offsets = torch.tensor([1, 2, 3, 5, 6], device=device)
    elif case == "offsets end":
        offsets = torch.tensor([0, 2, 3, 4, 5], device=device)
    with pytest.raises(ValueError, match=match):
        lvrpo_fast.process_advantages(rewards, ends, offsets, 2, 8, backend=name)


def test_bad_arguments_name_the_argument(backend):
    name, device = backend
    rewards, ends, offsets = _valid(device)

    def call(**kwargs):
        args = {"step_rewards": rewards, "step_ends": ends, "step_offsets": offsets, "group_size": 2, "seq_len": 8,
                "backend": name, **kwargs}
        return lvrpo_fast.process_advantages(**args)

    with pytest.raises(ValueError, match=r"step_ends must have shape \(6,\)"):
        call(step_ends=ends[:5])
    with pytest.raises(TypeError, match="step_ends must be an integer tensor"):
        call(step_ends=ends.float())
    with pytest.raises(TypeError, match="step_rewards must be a floating-point tensor"):
        call(step_rewards=ends)
    with pytest.raises(ValueError, match="group_size=3 must divide the number of sequences B=4"):
        call(group_size=3)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        call(group_size=1)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 0"):
        call(seq_len=-1)
    with pytest.raises(ValueError, match="scale must be one of"):
        call(scale="max")
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        call(eps=-1.0)
    with pytest.raises(ValueError, match="outcome_advantages was given without outcome_weight"):
        call(outcome_advantages=torch.zeros(4, device=device))
    with pytest.raises(ValueError, match="outcome_weight was given without outcome_advantages"):
        call(outcome_weight=0.5)
    with pytest.raises(ValueError, match=r"outcome_weight must be a number in \[0, 1\], got 1.5"):
        call(outcome_advantages=torch.zeros(4, device=device), outcome_weight=1.5)
    with pytest.raises(ValueError, match=r"outcome_advantages must have shape \(4,\)"):
        call(outcome_advantages=torch.zeros(3, device=device), outcome_weight=0.5)


@pytest.mark.parametrize("name", ("triton", "cpp"))
def test_fullgraph_compile_and_opcheck(name):
    """One custom op with a fake: torch.compile(fullgraph=True) traces it (the packing is checked inside the
    op at run time), and opcheck finds the schema and the fake consistent with the implementation."""
    name, device = _backend(name)
    from lvrpo_fast.fused import library
    from lvrpo_fast.fused.process_advantages import _CODEC, ProcessAdvantagesParams

    rewards, ends, offsets = packed_steps(3, 2, 9, device)
    outcome = torch.randn(6, device=device)

    def fn(r, e, o, a):
        return lvrpo_fast.process_advantages(r, e, o, 2, 9, outcome_advantages=a, outcome_weight=0.5, backend=name)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(rewards, ends, offsets, outcome), fn(rewards, ends, offsets, outcome))
    scalars, _ = _CODEC.encode(ProcessAdvantagesParams(backend=name, group_size=2, seq_len=9, scale="batch",
                                                       eps=1e-4, leave_one_out=True, outcome_weight=0.0))
    torch.library.opcheck(library.op("process_advantages"), (rewards, ends, offsets, None), scalars,
                          test_utils=("test_schema", "test_faketensor"))

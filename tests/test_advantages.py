"""group_advantages on the kernel backends against the float64 reference (docs/math.md section 2)."""
import pytest
import torch

import lvrpo_fast
from lvrpo_fast import dispatch, reference
from tolerances import assert_close_to_truth

SCALES = ("group", "batch", "none")
# (group size G, number of prompts P): odd B = P * G where G allows it, G = 2 included.
SHAPES = ((2, 7), (3, 5), (5, 3))


def _rewards(prompts, group_size, device, kind="gaussian"):
    """Fresh rewards [P * G] float32 with one group of equal rewards (the first) and, for
    kind="binary", 0/1 rewards as a verifier gives them (many equal groups, ties in the others)."""
    if kind == "binary":
        rewards = torch.randint(0, 2, (prompts * group_size,)).float()
    else:
        rewards = torch.randn(prompts * group_size) * 2.0 + 0.5
    rewards[:group_size] = 0.75
    return rewards.to(device)


def _check(name, device, rewards, group_size, **kwargs):
    out = lvrpo_fast.group_advantages(rewards, group_size, backend=name, **kwargs)
    ref = reference.group_advantages(rewards, group_size, **kwargs)
    truth = reference.group_advantages(rewards.double(), group_size, **kwargs)
    assert out.dtype == torch.float32 and out.shape == rewards.shape and out.device == rewards.device
    assert_close_to_truth(out, ref, truth, torch.float32, name=f"advantages {kwargs}")
    equal = (rewards.view(-1, group_size) == rewards.view(-1, group_size)[:, :1]).all(1)
    # A group of equal rewards is exactly 0, not merely close (docs/math.md section 2), whatever eps.
    assert (out.view(-1, group_size)[equal] == 0).all()
    return out


@pytest.mark.parametrize("eps", [0.0, 1e-4, 0.5])
@pytest.mark.parametrize("leave_one_out", [False, True])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("group_size,prompts", SHAPES)
def test_matches_reference(kernel_backend, group_size, prompts, scale, leave_one_out, eps):
    name, device = kernel_backend
    rewards = _rewards(prompts, group_size, device)
    out = _check(name, device, rewards, group_size, scale=scale, eps=eps, leave_one_out=leave_one_out)
    assert out.view(-1, group_size)[0].eq(0).all()
    assert out.view(-1, group_size)[1:].ne(0).any()  # the other groups carry signal


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("group_size,prompts", SHAPES)
def test_binary_rewards(kernel_backend, group_size, prompts, scale):
    name, device = kernel_backend
    for leave_one_out in (False, True):
        _check(name, device, _rewards(prompts, group_size, device, "binary"), group_size, scale=scale, eps=0.0,
               leave_one_out=leave_one_out)


@pytest.mark.parametrize("scale", SCALES)
def test_all_equal_never_nan(kernel_backend, scale):
    """Every group equal, eps = 0: 0 / 0 everywhere in a naive kernel (batch std is 0 too)."""
    name, device = kernel_backend
    rewards = torch.full((15,), -1.25, device=device)
    out = lvrpo_fast.group_advantages(rewards, 5, scale=scale, eps=0.0, backend=name)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rewards(kernel_backend, dtype):
    name, device = kernel_backend
    rewards = _rewards(5, 3, device).to(dtype)
    if not dispatch.usable(name, device, dtype)[0]:
        pytest.skip(f"{name} does not take {dtype}")
    # The kernels compute in float32 from the exactly representable low-precision rewards.
    _check(name, device, rewards, 3, scale="group", eps=1e-4, leave_one_out=False)


def test_non_contiguous_rewards(kernel_backend):
    name, device = kernel_backend
    rewards = _rewards(3, 5, device).repeat_interleave(2)[::2]
    assert not rewards.is_contiguous()
    _check(name, device, rewards, 5, scale="batch", eps=1e-4, leave_one_out=True)


def test_triton_multi_block(monkeypatch):
    """Groups and batches longer than one block: the kernels' loops with a ragged last block."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dispatch.usable("triton", device, torch.float32)[0] is None:
        pytest.skip("triton backend unavailable")
    from lvrpo_fast.kernels import autotune

    monkeypatch.setattr(autotune, "ADVANTAGES_MAX_BLOCK_GROUP", 2)
    monkeypatch.setattr(autotune, "ADVANTAGES_BLOCK_BATCH", 4)
    rewards = _rewards(3, 7, device)
    for scale in SCALES:
        _check("triton", device, rewards, 7, scale=scale, eps=0.0, leave_one_out=scale == "none")


def test_errors_name_the_argument(kernel_backend):
    name, device = kernel_backend
    rewards = torch.randn(10, device=device)
    with pytest.raises(ValueError, match="group_size=3 must divide"):
        lvrpo_fast.group_advantages(rewards, 3, backend=name)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        lvrpo_fast.group_advantages(rewards, 1, backend=name)
    with pytest.raises(ValueError, match="scale"):
        lvrpo_fast.group_advantages(rewards, 2, scale="max", backend=name)
    with pytest.raises(ValueError, match="eps"):
        lvrpo_fast.group_advantages(rewards, 2, eps=-1.0, backend=name)

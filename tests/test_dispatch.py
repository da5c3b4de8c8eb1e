"""The one dispatch point: keyword, environment variable, auto choice, fallback and refusal."""
import warnings

import pytest
import torch

import lvrpo_fast
from lvrpo_fast import backends, dispatch, reference


def test_keyword_beats_environment(monkeypatch):
    monkeypatch.setenv("LVRPO_BACKEND", "triton")
    assert dispatch.select("reference", torch.device("cpu"), torch.float32) is reference


def test_environment_variable_forces_reference(monkeypatch):
    monkeypatch.setenv("LVRPO_BACKEND", "reference")
    assert dispatch.select(None, torch.device("cpu"), torch.float32) is reference


@pytest.mark.parametrize("source", ["keyword", "env"])
def test_unknown_backend_is_refused(monkeypatch, source):
    if source == "env":
        monkeypatch.setenv("LVRPO_BACKEND", "cuda")
        with pytest.raises(ValueError, match=r"LVRPO_BACKEND must be one of .*got 'cuda'"):
            lvrpo_fast.group_advantages(torch.rand(4), 2)
    else:
        with pytest.raises(ValueError, match=r"backend must be one of .*got 'fast'"):
            lvrpo_fast.group_advantages(torch.rand(4), 2, backend="fast")


def test_float64_auto_goes_to_reference(monkeypatch):
    monkeypatch.delenv("LVRPO_BACKEND", raising=False)
    assert dispatch.select("auto", torch.device("cpu"), torch.float64) is reference


def test_unavailable_backend_explicitly_raises_with_reason(monkeypatch):
    monkeypatch.setitem(backends.MODULES, "cpp", "lvrpo_fast.backends._does_not_exist")
    with pytest.raises(RuntimeError, match=r"backend 'cpp' cannot run on cpu .*ModuleNotFoundError"):
        dispatch.select("cpp", torch.device("cpu"), torch.float32)


def test_auto_falls_back_to_reference_with_a_warning(monkeypatch):
    monkeypatch.delenv("LVRPO_BACKEND", raising=False)
    monkeypatch.setitem(backends.MODULES, "cpp", "lvrpo_fast.backends._does_not_exist")
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match=r"the cpp backend is unavailable \(ModuleNotFoundError"):
        impl = dispatch.select("auto", torch.device("cpu"), torch.float32)
    assert impl is reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once per reason, not on every call
        assert dispatch.select("auto", torch.device("cpu"), torch.float32) is reference


def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    module, why = dispatch.usable("triton", torch.device("cpu"), torch.float32)
    assert module is None and "CUDA" in why


def test_kernel_backends_refuse_float64():
    for name in ("triton", "cpp"):
        module, why = dispatch.usable(name, torch.device("cpu"), torch.float64)
        assert module is None and why

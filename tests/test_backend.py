"""Backend selection (SPEC 2) and build facts."""

import pytest
import torch

import msa_fast
from msa_fast import _backend


def test_build_info_reports_the_extension():
    info = msa_fast.build_info()
    for key in ("extension", "torch", "cpu_ops", "cuda_ops", "cuda_archs", "triton"):
        assert key in info
    if info["extension"]:
        assert "mine_pairs" in info["cpu_ops"]
    else:
        assert "not built" in info["reason"]


def test_set_backend_validates_and_restores():
    assert msa_fast.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend: expected one of"):
        msa_fast.set_backend("fastest")
    with msa_fast.use_backend("eager"):
        assert msa_fast.get_backend() == "eager"
        assert _backend.resolve("mine_pairs", None, torch.device("cpu")) == "eager"
    assert msa_fast.get_backend() == "auto"


def test_auto_never_fails_and_explicit_unavailable_raises():
    cpu = torch.device("cpu")
    assert _backend.resolve("dual_gate", "auto", cpu) in msa_fast.available("dual_gate", cpu)
    with pytest.raises(RuntimeError, match="cuda.*CUDA tensors"):
        _backend.resolve("mine_pairs", "cuda", cpu)
    with pytest.raises(RuntimeError, match="no cpp implementation of dual_gate"):
        _backend.resolve("dual_gate", "cpp", cpu)


def test_auto_prefers_cpp_for_mining_on_cpu(has_ext):
    expected = "cpp" if has_ext else "eager"
    assert _backend.resolve("mine_pairs", "auto", torch.device("cpu")) == expected
    assert ("cpp" in msa_fast.available("mine_pairs")) == has_ext


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    _backend.register("_probe_op", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = _backend.unavailable_reason("_probe_op", "triton", torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.unavailable_reason("_probe_op", "triton", torch.device("cpu")) is None

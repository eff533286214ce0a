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


def _autocast_cases():
    from msa_fast import ops
    from msa_fast.nn import DualGateFusion, GatedAttentionPooling

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    gap = GatedAttentionPooling(8, num_modalities=3)
    fuse = DualGateFusion(8)
    x = r(2, 5, 8)
    q, k, v = r(2, 2, 4, 4), r(2, 2, 6, 4), r(2, 2, 6, 4)
    return {
        "add_layer_norm": (lambda: ops.add_layer_norm(x.bfloat16(), x, torch.ones(8), torch.zeros(8)),
                           torch.bfloat16),
        "attention": (lambda: ops.attention(q.bfloat16(), k, v), torch.bfloat16),
        "dual_gate (module: fp32 weights, bf16 h)": (lambda: fuse(r(2, 3, 8).bfloat16()), torch.bfloat16),
        "gated_attention_pool (module)": (lambda: gap(torch.stack([x, x, x]).bfloat16()), torch.bfloat16),
        "nt_xent": (lambda: ops.nt_xent(r(3, 8).bfloat16(), r(3, 8), r(3, 2, 8)), torch.float32),
        "triplet": (lambda: ops.triplet(r(3, 8).bfloat16(), r(3, 8), r(3, 8)), torch.float32),
    }


@pytest.mark.parametrize("name", list(_autocast_cases()))
def test_ops_accept_mixed_dtypes_under_autocast_only(name):
    """Under autocast a module meets bf16 activations and fp32 parameters: every op casts to
    one dtype (the autocast dtype; fp32 for losses). Outside autocast a mix is a ValueError."""
    fn, want = _autocast_cases()[name]
    with msa_fast.use_backend("eager"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn()
    assert out.dtype == want and torch.isfinite(out.float()).all()
    if "module" not in name:
        with msa_fast.use_backend("eager"), pytest.raises(ValueError, match="dtype"):
            fn()

"""Backend selection (contract §2) and build facts."""

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


def test_cpu_auto_order_is_the_measured_one():
    """msa_fast/_auto_order.py holds what benchmarks/ops/bench_auto.py measured (its JSON), every
    CPU chain of an op it covers follows it, and docs/backends.md shows that run's table."""
    import json
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "benchmarks", "results", "auto_cpu.json")) as fh:
        measured = json.load(fh)["order"]
    from msa_fast._auto_order import MEASURED

    assert {op: tuple(o) for op, o in measured.items()} == MEASURED["cpu"]
    for op, order in measured.items():
        chain = _backend.AUTO_ORDER[(op, "cpu")]
        assert chain[-1] == "eager" and list(chain[:-1]) == order[:order.index("eager")], op
    assert _backend.AUTO_ORDER[("attention", "cpu")][:2] == ("cpp", "sdpa")
    with open(os.path.join(root, "benchmarks", "results", "auto_cpu.md")) as fh:
        table = fh.read().strip()
    with open(os.path.join(root, "docs", "backends.md")) as fh:
        assert table in fh.read()


def test_compile_backend_is_the_compiled_reference_and_inlines_under_compile():
    """``compile``: torch.compile of the reference (same values, forward and backward); inside
    a graph being compiled it is the reference itself (no nested compile)."""
    from msa_fast import ops

    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 3, 8, generator=g, requires_grad=True)
    u = torch.randn(4, 3, 7, generator=g, requires_grad=True)
    w, b, gl = torch.randn(3, 8, generator=g), torch.randn(3, generator=g), torch.randn(4, 3, generator=g)
    got = ops.dual_gate(h, u, w, b, gl, 0.5, backend="compile")
    want = ops.dual_gate(h, u, w, b, gl, 0.5, backend="eager")
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(got[0].sum() + got[1].pow(2).sum(), (h, u))
    ge = torch.autograd.grad(want[0].sum() + want[1].pow(2).sum(), (h, u))
    for a, e in zip(ga, ge):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    fn = torch.compile(lambda *a: ops.dual_gate(*a, 0.5, backend="compile")[0], fullgraph=True)
    torch.testing.assert_close(fn(h, u, w, b, gl), want[0], rtol=1e-5, atol=1e-6)
    # fp64 is not a compiled dtype: auto runs the reference, an explicit request says so
    with pytest.raises(ValueError, match="backend 'compile' takes dtypes"):
        ops.dual_gate(h.double(), u.double(), w.double(), b.double(), gl.double(), 0.5, backend="compile")


@pytest.mark.parametrize("backend", ["compile", "auto"])
def test_compile_backend_checks_inside_its_graph(backend):
    """The ``compile`` backend runs the op's check inside the compiled function (so a call the
    graph serves skips the Python check): a bad input after good ones -- a wrong shape, a
    wrong tau, a mismatched dtype -- is still the check's ValueError, and good input of a new
    size still computes the reference's values."""
    from msa_fast import ops

    if backend == "auto" and _backend.AUTO_ORDER[("dual_gate", "cpu")][0] != "compile":
        pytest.skip("auto does not pick compile for dual_gate on this CPU's measured order")
    g = torch.Generator().manual_seed(1)

    def args(b, m=3, d=8, c=5):
        return (torch.randn(b, m, d, generator=g), torch.randn(b, m, c, generator=g),
                torch.randn(m, d, generator=g), torch.randn(m, generator=g), torch.randn(b, m, generator=g))

    good = args(4)
    ops.dual_gate(*good, 0.5, backend=backend)
    h, u, w, b, gl = good
    with pytest.raises(ValueError, match=r"dual_gate: w_z: expected shape \(3, 8\)"):
        ops.dual_gate(h, u, w[:2], b, gl, 0.5, backend=backend)
    with pytest.raises(ValueError, match="dual_gate: tau"):
        ops.dual_gate(h, u, w, b, gl, -1.0, backend=backend)
    with pytest.raises(ValueError, match="dual_gate: u: .*dtype torch.float32"):
        ops.dual_gate(h, u.half(), w, b, gl, 0.5, backend=backend)
    for n in (4, 6):
        other = args(n)
        got = ops.dual_gate(*other, 0.5, backend=backend)
        for a, e in zip(got, ops.dual_gate(*other, 0.5, backend="eager")):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_compile_backend_caches_per_op():
    """Each op's compiled function has its own code object, so its own Dynamo cache and
    recompile limit (a shared one made the fourth op's ``compile`` silently the reference)."""
    import msa_fast.ops  # noqa: F401

    compiled = [s.compiled for s in _backend.SPECS.values() if s.compiled is not None]
    assert len(compiled) >= 5
    assert len({f.run.checked.__code__ for f in compiled}) == len(compiled)


def _wide_and_narrow():
    """Per op with a register-resident Triton kernel: (args within its limit, args just past it)."""
    from msa_fast.ops import contrastive, layer_norm

    z = torch.zeros

    def ln(d):
        return (z(2, d), z(2, d), z(d), z(d), 1e-5)

    def gate(m, d, c):
        return (z(1, m, d), z(1, m, c), z(m, d), z(m), z(1, m), 0.5)

    def nt(d):
        return (z(2, d), z(2, d), z(2, 3, d), None, 0.5, "mean")

    def tri(d):
        return (z(2, d), z(2, d), z(2, d), 0.5, "mean")

    def fd(d):
        return (z(1, 3, d), z(1, 3, d), z(1, 2, 2, 3, d), z(1, 2, 3, d), 0.5, 0.5, 0.1, None, None, "mean")

    w = contrastive.MAX_WIDTH
    return {
        "add_layer_norm": (ln(layer_norm.MAX_WIDTH), ln(layer_norm.MAX_WIDTH + 1)),
        "dual_gate": (gate(4, 1024, 7), gate(4, 1025, 7)),
        "dual_gate (wide C)": (gate(4, 8, 1024), gate(5, 8, 1024)),
        "nt_xent": (nt(w), nt(w + 1)),
        "triplet": (tri(w), tri(w + 1)),
        "fd_cmdie_contrastive_loss": (fd(w), fd(w + 1)),
    }


@pytest.mark.parametrize("case", list(_wide_and_narrow()))
def test_auto_skips_triton_past_its_width_limit(case, monkeypatch):
    """``auto`` does not hand a register-resident Triton kernel a width it cannot hold: the
    next backend of the order takes it; an explicit ``triton`` raises, naming the limit."""
    import msa_fast.ops  # noqa: F401

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton available on CPU tensors (not run here)
    op = case.split(" ")[0]
    spec = _backend.SPECS[op]
    narrow, wide = _wide_and_narrow()[case]
    spec.check(*narrow)
    spec.check(*wide)
    triton_impl = spec.implementation("triton")
    assert triton_impl.limit is not None and triton_impl.limit_doc
    monkeypatch.setitem(_backend.AUTO_ORDER, (op, "cpu"), ("triton", "compile", "eager"))
    assert _backend.choose(spec, narrow, "auto") is triton_impl
    picked = _backend.choose(spec, wide, "auto")
    assert picked is not triton_impl
    compiled_ok = _backend.unavailable_reason(op, "compile", torch.device("cpu")) is None
    assert picked is (spec.compiled if compiled_ok else None)
    with pytest.raises(RuntimeError, match=r"backend 'triton' takes .*<="):
        _backend.choose(spec, wide, "triton")
    assert "<=" in _backend.backend_table().split(f"| `{op}` |")[1].split("\n")[0]


def test_public_ops_take_the_reference_parameters_and_backend():
    """Each public op is generated from its reference (``_backend.public_op``): the same
    parameters, defaults and annotations, then ``backend`` keyword-only; keywords work."""
    import inspect

    from msa_fast import ops

    P = inspect.Parameter
    for name in ("attention", "add_layer_norm", "gated_attention_pool", "dual_gate", "mine_pairs", "dipu"):
        op, spec = getattr(ops, name), _backend.SPECS[name]
        got = list(inspect.signature(op).parameters.values())
        want = list(inspect.signature(spec.reference).parameters.values())
        assert got[:len(want)] == want, name
        assert got[-1].name == "backend" and got[-1].kind is P.KEYWORD_ONLY and got[-1].default is None
        assert all(p.kind is P.KEYWORD_ONLY for p in got[len(want):]), name
        assert op.__module__ == spec.check.__module__ and op.__doc__
    assert [p.name for p in inspect.signature(ops.dipu).parameters.values()][-2:] == ["dropout_p", "backend"]
    q = torch.randn(1, 2, 3, 4)
    torch.testing.assert_close(ops.attention(q=q, k=q, v=q, scale=0.5, backend="eager"),
                               ops.reference.attention(q, q, q, None, 0.5))
    with pytest.raises(TypeError):
        ops.attention(q, q, q, None, 0.5, "eager")  # backend is keyword-only


def test_gpu_auto_order_is_written_from_a_saved_gpu_check_run(tmp_path, monkeypatch):
    """``bench_auto.py --order-from``: the order gpu_check measured on the device goes into
    ``_auto_order.py`` for ``cuda``, the CPU's untouched; a --quick run is refused."""
    import json
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    from benchmarks.ops import bench_auto
    from msa_fast._auto_order import MEASURED

    run = {"env": {"device": "NVIDIA H100", "threads": 1, "torch": "2.11.0", "commit": "abcdef1234"},
           "args": {"device": "cuda", "quick": False, "no_compile": True},
           "order": {"attention": ["sdpa", "triton", "eager"], "dual_gate": ["triton", "eager"]}}
    path = tmp_path / "auto_cuda.json"
    path.write_text(json.dumps(run))
    out = tmp_path / "_auto_order.py"
    monkeypatch.setattr(bench_auto, "ORDER_FILE", str(out))
    bench_auto.write_order(*bench_auto.order_from(str(path)))
    ns: dict = {}
    exec(out.read_text(), ns)
    assert ns["MEASURED"]["cuda"] == {"attention": ("sdpa", "triton", "eager"), "dual_gate": ("triton", "eager")}
    assert ns["MEASURED"]["cpu"] == MEASURED["cpu"]
    assert "NVIDIA H100" in out.read_text()
    run["args"]["quick"] = True
    path.write_text(json.dumps(run))
    with pytest.raises(SystemExit, match="quick"):
        bench_auto.order_from(str(path))

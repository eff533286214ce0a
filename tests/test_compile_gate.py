"""The compile gate (tools/compile_gate.py, contract §9) and the op descriptors it guards.

* the gate rejects what the interpreter accepts: a float global, a loop-carried type
  change, register spills (compiled for sm_90a in a process without the interpreter);
* a quick run over two ops captures the public ops' launches and compiles them;
* the committed full table covers, for every op whose ``auto`` may pick ``triton`` on a
  GPU, every dtype its descriptor declares, for sm_90a and sm_80, with no failure --
  so ``auto`` cannot reach a kernel the gate has not compiled;
* the README backend table is the one the descriptors generate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import msa_fast
from msa_fast import _backend, _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATE = os.path.join(ROOT, "tools", "compile_gate.py")
TABLE = os.path.join(ROOT, "benchmarks", "results", "compile_gate.json")
NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _no_interpreter_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the repository root (``tools.compile_gate``) and tests/ (the bad kernels' module)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    return env


def test_gate_rejects_what_the_interpreter_accepts():
    script = """
import json
from tools import compile_gate as g
t = {"tensor": "float32", "align16": True}
cases = {
    "float_global": {"kernel": "gate_bad_kernels:float_global_kernel", "args": [t, {"value": 100}],
                     "kwargs": {"BLOCK": {"value": 128}}},
    "loop_type": {"kernel": "gate_bad_kernels:loop_type_change_kernel", "args": [t, {"value": 100}],
                  "kwargs": {"BLOCK": {"value": 128}}},
    "spill": {"kernel": "gate_bad_kernels:spill_kernel", "args": [t],
              "kwargs": {"ROWS": {"value": 64}, "COLS": {"value": 256}, "num_warps": {"value": 1}}},
}
out = {}
for name, launch in cases.items():
    row = g.compile_one(launch, 90)
    out[name] = g._failures(row, "float32", [1, 1, 1])
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_no_interpreter_env(),
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["float_global"] and "CompilationError" in got["float_global"][0], got
    assert got["loop_type"] and "CompilationError" in got["loop_type"][0], got
    assert any("spill" in why for why in got["spill"]), got


def test_gate_limits_without_compiling():
    from tools import compile_gate as g

    ok = {"arch": "sm_90a", "error": None, "registers": 100, "spill_stores": 0, "spill_loads": 0, "shared": 1000,
          "static_smem": 0, "tf32": False, "wgmma": False}
    assert g._failures(ok, "bfloat16", [1, 1, 1]) == []
    assert g._failures({**ok, "spill_stores": 4}, "bfloat16", [1, 1, 1])  # no spill at all in 16-bit
    assert g._failures({**ok, "spill_stores": 1024}, "float32", [1, 1, 1]) == []
    assert g._failures({**ok, "spill_loads": 1025}, "float32", [1, 1, 1])
    assert g._failures({**ok, "shared": 232_449}, "float32", [1, 1, 1])
    assert g._failures({**ok, "arch": "sm_80", "shared": 166_913}, "float32", [1, 1, 1])
    assert g._failures({**ok, "tf32": True}, "float32", [1, 1, 1])  # fp32 tl.dot must stay IEEE
    assert g._failures(ok, "float32", [1, 65_536, 1])  # grid y and z stop at 65,535
    log = ("[1/2] nvcc -c /x/csrc/cuda/pair_mining.cu\n"
           "ptxas info    : Compiling entry function '_Z1k' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z1k\n"
           "    0 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers, 22528 bytes smem\n"
           "ptxas info    : Compiling entry function '_Z1k' for 'sm_80'\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 96 registers\n")
    rows = {r["arch"]: r for r in g.parse_ptxas_log(log)}
    assert rows["sm_90"]["max_spill"] == 8 and rows["sm_90"]["error"] and rows["sm_90"]["max_registers"] == 168
    assert rows["sm_80"]["error"] is None and rows["sm_80"]["source"] == "csrc/cuda/pair_mining.cu"


def test_quick_gate_compiles_the_public_ops_launches(tmp_path):
    proc = subprocess.run([sys.executable, GATE, "--quick", "--no-cuda", "--ops", "dual_gate,add_layer_norm",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=_no_interpreter_env(),
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = json.load(open(tmp_path / "compile_gate_quick.json"))
    rows = table["triton_kernels"]
    kernels = {(r["op"], r["kernel"], r["dtype"], r["pass"]) for r in rows}
    for dtype in NAMES.values():
        assert ("dual_gate", "dual_gate_fwd_kernel", dtype, "forward") in kernels
        assert ("dual_gate", "dual_gate_bwd_kernel", dtype, "backward") in kernels
        assert ("add_layer_norm", "add_layer_norm_bwd_kernel", dtype, "backward") in kernels
    assert all(r["arch"] == "sm_90a" and r["registers"] > 0 and not r["failures"] for r in rows)


def _committed_table():
    with open(TABLE) as fh:
        return json.load(fh)


def test_committed_table_passes_and_covers_every_auto_reachable_kernel():
    table = _committed_table()
    assert table["failures"] == 0 and not table["env"]["quick"]
    rows = table["triton_kernels"]
    assert rows and all(not r["failures"] for r in rows)
    assert set(table["env"]["archs"]) == {"sm_90", "sm_80"}
    for name, spec in _backend.SPECS.items():
        triton_impl = spec.implementation("triton")
        if triton_impl is None or "cuda" not in triton_impl.auto:
            continue
        for dtype in triton_impl.dtypes:
            for arch in ("sm_90a", "sm_80"):
                hit = [r for r in rows if r["op"] == name and r["dtype"] == NAMES[dtype] and r["arch"] == arch]
                assert hit, f"auto on a CUDA tensor may run {name} in {dtype} with triton, not compiled for {arch}"
                assert {r["pass"] for r in hit} >= {"forward"}
    cuda_rows = table["cuda_sources"]
    if any(spec.implementation("cuda") is not None for spec in _backend.SPECS.values()):
        assert cuda_rows and all(r["error"] is None for r in cuda_rows), cuda_rows
        assert {"sm_80", "sm_90", "sm_100", "sm_120"} <= {r["arch"] for r in cuda_rows}


def test_committed_table_of_the_gpu_machines_triton_passes():
    # the lent H200 runs Triton 3.6: the same launches compiled with it (no CUDA part)
    with open(os.path.join(ROOT, "benchmarks", "results", "compile_gate_triton36.json")) as fh:
        table = json.load(fh)
    assert table["env"]["triton"].startswith("3.6") and not table["env"]["quick"]
    assert table["failures"] == 0 and len(table["triton_kernels"]) == len(_committed_table()["triton_kernels"])


def test_no_descriptor_sends_fp64_or_an_undeclared_dtype_to_a_kernel():
    for spec in _backend.SPECS.values():
        for f in spec.fused:
            if f.backend == "triton":
                assert torch.float64 not in f.dtypes, spec.name


def test_readme_backend_table_is_generated_from_the_descriptors():
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    assert _backend.backend_table() in readme


def test_explicit_backend_with_an_undeclared_dtype_raises_value_error():
    h = torch.randn(4, 3, 8, dtype=torch.float64)
    args = (h, torch.randn(4, 3, 7, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64),
            torch.randn(3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    if "triton" in msa_fast.available("dual_gate", "cpu"):
        with pytest.raises(ValueError, match="dual_gate: backend 'triton' takes dtypes .* got torch.float64"):
            msa_fast.ops.dual_gate(*args, backend="triton")
    # auto: the reference, exactly
    got = msa_fast.ops.dual_gate(*args)
    for a, b in zip(got, msa_fast.ops.reference.dual_gate(*args)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_descriptor_limits_are_the_kernels_limits():
    """The ops declare the kernels' limits without importing triton (optional): check
    that the declared numbers are the kernels' own."""
    import re

    pytest.importorskip("triton")
    from msa_fast.kernels.triton import attention, gap, pair_mining

    mine = _backend.SPECS["mine_pairs"]
    f, lab = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    with open(os.path.join(ROOT, "csrc", "cuda", "pair_mining.cu")) as fh:
        cuda_max_k = int(re.search(r"constexpr int kMaxK = (\d+);", fh.read()).group(1))
    for backend, max_k in (("triton", pair_mining.MAX_K), ("cuda", cuda_max_k)):
        limit = mine.implementation(backend).limit
        assert limit(f, lab, max_k, None, None, None) is None and limit(f, lab, max_k + 1, None, None, None)
    head = _backend.SPECS["attention"].implementation("triton").limit
    q = torch.empty(1, 1, 1, attention.MAX_HEAD_DIM)
    assert head(q) is None and head(torch.empty(1, 1, 1, attention.MAX_HEAD_DIM + 1))
    width = _backend.SPECS["gated_attention_pool"].implementation("triton").limit
    w = gap.MAX_WIDTH

    def gap_args(d, h, ha):
        return (torch.empty(3, 1, 1, d), None, None, torch.empty(3, h, d), None, None, None, torch.empty(ha, d))

    assert width(*gap_args(w, w, w)) is None
    for d, h, ha in ((w + 1, 8, 8), (8, w + 1, 8), (8, 8, w + 1)):
        assert width(*gap_args(d, h, ha)), (d, h, ha)


def test_auto_order_comes_from_the_measurement_or_the_descriptors():
    # CPU: measured (msa_fast/_auto_order.py, see tests/test_backend.py); CUDA: declared
    assert _backend.AUTO_ORDER[("mine_pairs", "cpu")] == ("cpp", "eager")
    assert _backend.AUTO_ORDER[("attention", "cpu")] == ("cpp", "sdpa", "eager")
    assert _backend.AUTO_ORDER[("mine_pairs", "cuda")] == ("cuda", "triton", "eager")
    assert _backend.AUTO_ORDER[("attention", "cuda")] == ("sdpa", "triton", "eager")
    assert _backend.AUTO_ORDER[("dipu", "cuda")] == ("eager",)


@pytest.mark.parametrize("archs, cap, runs", [
    (["8.0", "9.0", "10.0", "12.0+PTX"], (8, 6), True),    # sm_80 cubin runs on sm_86
    (["8.0", "9.0", "10.0", "12.0+PTX"], (12, 0), True),
    (["8.0", "9.0", "10.0", "12.0+PTX"], (12, 1), True),   # sm_120 cubin on sm_121
    (["8.0", "9.0", "10.0", "12.0+PTX"], (13, 0), True),   # PTX, JIT-compiled by the driver
    (["8.0", "9.0"], (12, 0), False),                      # the old default on an RTX 5090
    (["8.0", "9.0"], (10, 0), False),
    (["9.0a"], (9, 0), True),
    (["9.0a"], (10, 0), False),                            # arch-specific: that GPU only
    (["8.6"], (8, 0), False),                              # a cubin never runs on an older minor
    (["7.5+PTX"], (8, 0), True),
])
def test_arch_runs(archs, cap, runs):
    assert _ext.arch_runs(archs, cap) is runs


def test_build_records_its_archs(has_ext):
    info = msa_fast.build_info()
    if not has_ext or not info.get("with_cuda"):
        pytest.skip("the extension was built without its CUDA part")
    assert info["cuda_archs"], info
    assert _ext.arch_runs(info["cuda_archs"], (12, 0)) or "TORCH_CUDA_ARCH_LIST" in os.environ

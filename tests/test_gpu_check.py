"""tools/gpu_check.sh's modes, read through its dry run (no GPU needed, nothing runs).

The lent GPU gives 15 minutes in all and 10 a command, so the script's step order, caps and
arguments are what decides whether a lease brings results back: ``GPU_CHECK_DRY_RUN=1``
prints each step's command and records it as passed, which these tests read.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _run(tmp_path, *args, dry=True):
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path / "gc"), "PYTHON": sys.executable}
    env.pop("OUT", None)
    if dry:
        env["GPU_CHECK_DRY_RUN"] = "1"
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    return proc


def _steps(tmp_path, *args):
    proc = _run(tmp_path, *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "gc" / "summary.json").read_text())
    commands = {}
    for name in summary["steps"]:
        log = tmp_path / "gc" / f"{name}.log"
        commands[name] = log.read_text() if log.exists() else ""
    return summary, commands


def test_full_run_puts_the_system_benchmarks_before_the_fp32_sweep(tmp_path):
    summary, commands = _steps(tmp_path)
    assert summary["finished"] is True and summary["mode"] == "full"
    order = list(summary["steps"])
    fp32 = [i for i, name in enumerate(order) if name.endswith("_float32")]
    assert fp32, order
    assert order.index("bench_inference") < min(fp32)
    assert order.index("bench_train_step") < min(fp32)
    assert order.index("pytest_gpu") < order.index("bench_auto")


def test_op_benchmarks_skip_torch_compile_unless_asked(tmp_path):
    _, commands = _steps(tmp_path)
    op_rows = {k: v for k, v in commands.items() if k.startswith(("bench_gap_", "bench_attention_"))}
    assert op_rows
    for name, cmd in op_rows.items():
        providers = cmd.split("--providers", 1)[1].split("--out")[0].split()
        assert "torch.compile" not in providers, (name, cmd)
        assert "triton" in providers, (name, cmd)
    assert "--providers eager auto bf16" in commands["bench_train_step"]
    _, asked = _steps(tmp_path, "--providers", "eager torch.compile triton")
    assert "--providers eager torch.compile triton --out" in asked["bench_gap_float32"]


def test_core_runs_build_tests_and_sanitizer_only(tmp_path):
    summary, _ = _steps(tmp_path, "--core")
    steps = summary["steps"]
    assert summary["mode"] == "core"
    assert steps["build"]["status"] == steps["pytest_gpu"]["status"] == "passed"
    assert "sanitizer" in steps
    assert not [name for name, s in steps.items() if name.startswith("bench_") and s["status"] == "passed"]
    assert steps["benchmarks"]["status"] == "skipped" and "--bench" in steps["benchmarks"]["reason"]


def test_bench_skips_tests_and_sanitizer_and_runs_every_benchmark(tmp_path):
    summary, _ = _steps(tmp_path, "--bench")
    steps = summary["steps"]
    assert steps["pytest_gpu"]["status"] == "skipped" and steps["sanitizer"]["status"] == "skipped"
    assert {"bench_auto", "bench_inference", "bench_train_step", "bench_pair_mining_float32"} <= set(steps)


def test_unknown_argument_is_one_line_and_exit_2(tmp_path):
    proc = _run(tmp_path, "--fast", dry=False)
    assert proc.returncode == 2
    assert proc.stdout.strip().count("\n") == 0 and "--fast" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
@pytest.mark.parametrize("mode", [[], ["--core"], ["--bench"]])
def test_without_a_gpu_every_gpu_mode_says_so_in_one_line_and_exits_2(tmp_path, mode):
    proc = _run(tmp_path, *mode, dry=False)
    assert proc.returncode == 2, proc.stdout
    assert proc.stdout.strip().count("\n") == 0 and "no CUDA GPU" in proc.stdout


def test_the_default_providers_are_accepted_by_every_op_benchmark(tmp_path):
    """gpu_check hands one --providers list to every op benchmark: each must take it (a
    provider this machine cannot run is dropped, an unknown name is an error)."""
    import re

    default = re.search(r'PROVIDERS=\$\{GPU_CHECK_PROVIDERS:-"([^"]+)"\}', SCRIPT.read_text()).group(1).split()
    assert "triton" in default and "torch.compile" not in default
    for op in ("dual_gate", "gap", "layer_norm", "attention"):
        out = tmp_path / f"{op}.json"
        proc = subprocess.run([sys.executable, f"benchmarks/ops/bench_{op}.py", "--quick", "--device", "cpu",
                               "--providers", *default, "--out", str(out)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, (op, proc.stdout[-1000:], proc.stderr[-1000:])
        providers = {r["provider"] for r in json.loads(out.read_text())["results"]}
        assert "eager" in providers and "torch.compile" not in providers, (op, providers)
    bad = subprocess.run([sys.executable, "benchmarks/ops/bench_gap.py", "--quick", "--device", "cpu",
                          "--providers", "bogus", "--out", str(tmp_path / "x.json")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown ['bogus']" in bad.stdout + bad.stderr

"""tools/sanitize_calls.py, the list gpu_check.sh runs under compute-sanitizer, runs
through the Triton interpreter here: every call builds, runs forward and backward, and its
gradients are finite (on the device the same list runs compiled under memcheck)."""
import os
import subprocess
import sys

import pytest

from msa_fast import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.interpret
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_every_triton_op_has_an_odd_shaped_sanitizer_call_and_it_runs():
    from tools import sanitize_calls

    triton_ops = {name for name, spec in _backend.SPECS.items()
                  if any(f.backend == "triton" for f in spec.fused)}
    assert triton_ops - {"mine_pairs"} <= {op for op, _, _ in sanitize_calls.TRITON_CALLS}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "sanitize_calls.py"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count(" ok") == len(sanitize_calls.TRITON_CALLS) + 1, out.stdout

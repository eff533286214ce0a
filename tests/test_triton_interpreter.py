"""The interpreter quirk that the device image (Triton 3.6, numpy 2.5) hit and this
machine's Triton 3.8 does not: ``range`` over a runtime scalar inside a kernel
(tools/triton_interpreter.py, applied by tests/conftest.py). Run under both by
``tools/gpu_rehearsal.sh``."""

import pytest
import torch

triton = pytest.importorskip("triton")
import conftest  # noqa: E402
import triton.language as tl  # noqa: E402

from tools import triton_interpreter as ti  # noqa: E402

pytestmark = pytest.mark.interpret


@triton.jit
def _count_kernel(out_ptr, N, BLOCK: tl.constexpr):
    # every kind of loop bound the kernels use: a runtime int argument with a constexpr
    # step (attention, mining, contrastive), and a reduction's result (mining's merge steps)
    tiles = 0
    for _n0 in range(0, N, BLOCK):
        tiles += 1
    steps = tl.reduce(tl.arange(0, BLOCK), 0, tl.standard._sum_combine)
    for _ in range(steps):
        tiles += 1000
    tl.store(out_ptr, tiles)


@pytest.mark.parametrize("n", [1, 37, 64])
def test_range_over_runtime_scalars(n):
    out = torch.zeros(1, dtype=torch.int32)
    _count_kernel[(1,)](out, n, BLOCK=8)
    assert out.item() == -(-n // 8) + 1000 * sum(range(8))


def test_patch_only_where_the_interpreter_needs_it():
    from triton.runtime import interpreter

    patched = conftest.INTERPRETER_INDEX_PATCHED
    hook = interpreter._patch_lang_tensor
    assert getattr(hook, "_msa_fast", False) == patched
    # importing again must not wrap twice
    assert ti.fix_interpreter_index() is False
    assert interpreter._patch_lang_tensor is hook

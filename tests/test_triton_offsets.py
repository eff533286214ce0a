"""64-bit offsets and the launch device guard of the Triton kernels
(``msa_fast/kernels/triton/_common.py``): an offset built from ``pid64`` does not wrap past
2**31 elements where one built from the plain int32 program id does, every kernel takes its
program ids from ``pid64``, and ``on_tensor_device`` is a no-op on CPU tensors."""

import pathlib
import re

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from msa_fast.kernels.triton import _common  # noqa: E402

KERNELS = pathlib.Path(_common.__file__).parent


@triton.jit
def _offset_kernel(out64_ptr, out32_ptr, D, M):
    # the kernels' offset shapes: row * D (layer norm), r * M * D (dual gate)
    out64 = _common.pid64(0) * M * D
    out32 = tl.program_id(0) * M * D
    tl.store(out64_ptr + tl.program_id(0), out64)
    tl.store(out32_ptr + tl.program_id(0), out32.to(tl.int64))


@pytest.mark.interpret
def test_pid64_offsets_do_not_wrap():
    D, M, grid = 2**20, 1024, 5  # r * M * D = r * 2**30: 2**31 at r = 2
    out64 = torch.zeros(grid, dtype=torch.int64)
    out32 = torch.zeros(grid, dtype=torch.int64)
    _offset_kernel[(grid,)](out64, out32, D, M)
    want = torch.arange(grid, dtype=torch.int64) * M * D
    assert torch.equal(out64, want)
    assert not torch.equal(out32, want)  # the int32 product wraps: the test can tell


@pytest.mark.parametrize("module", ["layer_norm", "dual_gate", "gap", "attention", "nt_xent", "triplet", "fd_cmdie_contrastive_loss"])
def test_kernels_take_program_ids_from_pid64(module):
    """Every id that scales a whole slice (row, batch x head, modality) is pid64's. Attention
    keeps its axis-1 id (a block inside one (b, h) slice) int32 so that its offset tiles stay
    int32 registers: the int64 tiles spilled the 16-bit dK/dV kernel on sm_80 (compile gate)."""
    src = (KERNELS / f"{module}.py").read_text()
    assert "pid64(" in src
    raw = re.findall(r"tl\.program_id\((\d)\)", src)
    assert raw == (["1"] * 3 if module == "attention" else []), f"{module}: int32 program ids {raw}; use pid64"
    if module == "attention":
        assert src.count("bh = pid64(0)") == 3


@pytest.mark.parametrize("module", ["layer_norm", "dual_gate", "gap", "attention", "nt_xent", "triplet", "fd_cmdie_contrastive_loss", "pair_mining"])
def test_host_wrappers_are_device_guarded(module):
    import importlib

    mod = importlib.import_module(f"msa_fast.kernels.triton.{module}")
    wrappers = [n for n in dir(mod) if re.fullmatch(r"\w+_(forward|backward)", n)]
    assert wrappers
    for n in wrappers:
        assert getattr(getattr(mod, n), "__wrapped__", None) is not None, f"{module}.{n} is not on_tensor_device"


def test_device_guard_is_a_noop_on_cpu():
    @_common.on_tensor_device
    def f(a, b=None):
        return a + 1 if a is not None else b

    assert torch.equal(f(torch.zeros(2)), torch.ones(2))
    assert f(None, b=torch.zeros(1)).shape == (1,)
    assert f(3) == 4  # no tensor at all: called as it is
    with _common.device_guard(torch.zeros(1)):
        pass


@pytest.mark.gpu
def test_device_guard_switches_to_the_tensor_device():
    t = torch.zeros(1, device="cuda")
    before = torch.cuda.current_device()

    @_common.on_tensor_device
    def f(x):
        return torch.cuda.current_device()

    assert f(t) == t.device.index
    assert torch.cuda.current_device() == before

"""Kernels the compile gate must reject (tests/test_compile_gate.py). Not part of the
library: each carries one fault that the interpreter accepts and a GPU compile refuses
or pays for."""

import triton
import triton.language as tl

SCALE = 0.5  # a plain Python float global: the interpreter reads it, the compiler refuses it


@triton.jit
def float_global_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=ok) * SCALE, mask=ok)


@triton.jit
def loop_type_change_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.load(x_ptr)  # a scalar before the loop ...
    for i in range(0, n, BLOCK):
        acc = tl.load(x_ptr + i + offs)  # ... a block inside it
    tl.store(x_ptr + offs, acc)


@triton.jit
def spill_kernel(x_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    # with one warp, a (64, 256) fp32 tile is 512 values per thread, all live until
    # the sum is known: more than the 255 registers a thread has
    offs_r = tl.arange(0, ROWS)
    offs_c = tl.arange(0, COLS)
    ptrs = x_ptr + offs_r[:, None] * COLS + offs_c[None, :]
    x = tl.load(ptrs)
    tl.store(ptrs, x * tl.sum(tl.sum(x, axis=1), axis=0))

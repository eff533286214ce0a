"""Test setup. TRITON_INTERPRET must be set before any @triton.jit is decorated,
so it is set here, before msa_fast (and its kernel modules) are imported -- only
without a GPU: on a GPU machine the kernels compile for real (``pytest -m gpu``).

Two worlds, one suite:

* ``@pytest.mark.interpret``: runs Triton kernels on CPU tensors, which only the
  interpreter can; skipped (with the reason) whenever ``TRITON_INTERPRET`` is not 1,
  i.e. on a GPU machine, where the ``gpu`` tests run the same kernels compiled.
  ``TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES= pytest`` runs them there too.
* ``@pytest.mark.gpu``: needs a CUDA GPU; skipped without one.

Everything else passes in both.
"""

import os

# Under the interpreter tl.dot is numpy's matmul; with several OpenBLAS threads the
# rounding of a tile element depends on how the tile was split across threads, so
# copies of one row could get similarities an ulp apart. One thread: one split.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.6's interpreter with numpy >= 2.4 (the lent GPU machine's pair): its fix, applied
# only where the installed interpreter needs it (tools/triton_interpreter.py)
from tools.triton_interpreter import fix_interpreter_index  # noqa: E402

INTERPRETER_INDEX_PATCHED = fix_interpreter_index()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_interpreter = pytest.mark.skip(
        reason="runs Triton on CPU tensors, which needs TRITON_INTERPRET=1 (the gpu tests cover the compiled kernels)")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "interpret" in item.keywords and not interpreted:
            item.add_marker(no_interpreter)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def has_ext():
    import msa_fast

    return msa_fast.build_info()["extension"]


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny models: on a shared 2-core machine the OpenMP
    synchronisation of two threads costs far more than it saves."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

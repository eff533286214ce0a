// The Python module msa_fast._C. Importing it loads the shared library, whose
// static initialisers register every op (TORCH_LIBRARY in csrc/ops.cpp,
// TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda). It exports only build facts;
// the ops are reached through torch.ops.msa_fast.*. Plain CPython API, no
// pybind11, so that this file compiles in a second.
#include <Python.h>

#ifndef MSA_FAST_WITH_CUDA
#define MSA_FAST_WITH_CUDA 0
#endif
#ifndef MSA_FAST_CUDA_ARCHS
#define MSA_FAST_CUDA_ARCHS ""
#endif

static struct PyModuleDef msa_fast_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "msa_fast C++/CUDA ops (registered in torch.ops.msa_fast)", -1,
    nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&msa_fast_c_module);
  if (m == nullptr) return nullptr;
  PyModule_AddIntConstant(m, "with_cuda", MSA_FAST_WITH_CUDA);
  PyModule_AddStringConstant(m, "cuda_archs", MSA_FAST_CUDA_ARCHS);
#ifdef _OPENMP
  PyModule_AddIntConstant(m, "with_openmp", 1);
#else
  PyModule_AddIntConstant(m, "with_openmp", 0);
#endif
  return m;
}

"""Triton kernels, one file per op (compiled on a GPU; on a CPU only through Triton's
interpreter, ``TRITON_INTERPRET=1``: see ``tools/triton_interpreter.py`` for Triton 3.6 with
numpy >= 2.4)."""

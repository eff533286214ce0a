"""Repository tools (not installed): the compile gate, the sanitizer calls and the GPU
scripts (``gpu_check.sh``, ``gpu_rehearsal.sh``). Run from the repository root, as files
or modules (``python tools/compile_gate.py`` or ``python -m tools.compile_gate``)."""

"""The benchmarks (not installed with the package): ``ops/`` one script per op (and
``bench_auto.py``, the measured ``auto`` order), ``models/`` whole-model latency, training
step, inference and serving; ``_common.py`` their shared harness. Results land in
``benchmarks/results/``. Run a script as a file or as a module from the repository root::

    python benchmarks/ops/bench_gap.py --quick
    python -m benchmarks.ops.bench_gap --quick
"""

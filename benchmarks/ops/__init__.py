"""Op benchmarks: one ``bench_<op>.py`` per public op (``SHAPES`` and ``build``, which the
compile gate and the sanitizer calls of ``tools/`` reuse), and ``bench_auto.py``."""

"""Fidelity experiments (not installed): the models trained and measured against the
papers' claims; results in ``benchmarks/results/``. Run from the repository root, as files or
modules (``python experiments/fidelity_models.py`` or ``python -m experiments.fidelity_models``)."""

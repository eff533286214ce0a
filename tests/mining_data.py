"""Random mining inputs shared by the CPU / Triton and the CUDA mine_pairs tests."""

import torch


def random_mining_data(n, d, classes, dtype=torch.float32, dup=0, zeros=0, seed=0):
    """``(features (n, d), labels (n,))``: Gaussian rows (drawn in fp64, cast to ``dtype``),
    ``dup`` rows overwritten by exact copies of others (similarity ties), ``zeros`` zero rows."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    if dup:  # exact copies of other rows: similarity ties up to the norm's rounding
        src = torch.randint(0, n, (dup,), generator=g)
        dst = torch.randint(0, n, (dup,), generator=g)
        f[dst] = f[src]
    if zeros:
        f[torch.randint(0, n, (zeros,), generator=g)] = 0
    return f, labels

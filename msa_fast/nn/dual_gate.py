"""``DualGateFusion``: AGFN's entropy + importance dual-gate fusion (SPEC 3.1) as a module."""

from __future__ import annotations

import torch
from torch import nn

from msa_fast import ops
from msa_fast.ops import _validate as V


class DualGateFusion(nn.Module):
    """Fuse M modality vectors ``h: (..., M, D)`` into one ``(..., D)``.

    ``h_ent, h_imp_in, e, g = msa_fast.ops.dual_gate(h, w_z, b_z, g_logits, tau)`` with
    ``g_logits = importance(concat_m h_m)``; ``h_imp = W_f(h_imp_in)``;
    ``fused = a * h_ent + (1 - a) * h_imp``, ``a = sigmoid(alpha)``.

    Parameters: ``w_z: (M, D)`` (init ``N(0, 1/D)``, so that ``z`` starts O(1)),
    ``b_z: (M,)`` (zeros); ``importance`` = Linear(M*D, hidden) - GELU - Dropout -
    Linear(hidden, M) (the SPEC leaves the activation open: GELU, as the rest of
    the library); ``W_f`` = ``nn.Linear(M*D, D)`` (with bias); ``alpha`` a scalar,
    initialised to 0 (``a = 0.5``). ``dropout`` acts on the importance MLP's hidden
    layer and on the fused output (train mode only).

    ``last_weights`` holds the last forward's ``(e, g)``, each ``(..., M)``, detached.
    ``backend`` is passed to :func:`msa_fast.ops.dual_gate` (``None``: global default).
    """

    def __init__(self, dim: int, num_modalities: int = 3, tau: float = 1.0, hidden: int | None = None,
                 dropout: float = 0.0, backend: str | None = None) -> None:
        super().__init__()
        hidden = dim if hidden is None else hidden
        self.dim, self.num_modalities, self.tau, self.backend = dim, num_modalities, float(tau), backend
        self.w_z = nn.Parameter(torch.randn(num_modalities, dim) * dim**-0.5)
        self.b_z = nn.Parameter(torch.zeros(num_modalities))
        self.importance = nn.Sequential(
            nn.Linear(num_modalities * dim, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_modalities))
        self.W_f = nn.Linear(num_modalities * dim, dim)
        self.alpha = nn.Parameter(torch.zeros(()))
        self.dropout = nn.Dropout(dropout)
        self.last_weights: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not isinstance(h, torch.Tensor) or h.dim() < 2 or tuple(h.shape[-2:]) != (self.num_modalities, self.dim):
            V.fail("DualGateFusion", "h", f"a tensor of shape (..., {self.num_modalities}, {self.dim})", h)
        g_logits = self.importance(h.flatten(-2))
        h_ent, h_imp_in, e, g = ops.dual_gate(h, self.w_z, self.b_z, g_logits, self.tau, backend=self.backend)
        a = torch.sigmoid(self.alpha)
        fused = a * h_ent + (1 - a) * self.W_f(h_imp_in)
        self.last_weights = (e.detach(), g.detach())
        return self.dropout(fused)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_modalities={self.num_modalities}, tau={self.tau}, backend={self.backend!r}"

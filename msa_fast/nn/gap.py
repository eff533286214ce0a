"""``GatedAttentionPooling``: FD-CMDIE's GAP (eq. 25-29, contract §3.2) as a module."""

from __future__ import annotations

import torch
from torch import nn

from msa_fast import ops


class GatedAttentionPooling(nn.Module):
    """Pool M sequences ``x: (M, B, L, d)`` (modalities t, a, v) into ``(B, L, d)``.

    Owns, per modality, a LayerNorm (``ln_w, ln_b: (M, d)``) and a GateMLP
    d -> hidden -> 1 (``W1g: (M, hidden, d)``, ``b1g, w2g: (M, hidden)``, ``b2g: (M,)``),
    and one attention MLP d -> hidden -> 1 shared by all modalities (``W1a, b1a,
    w2a, b2a``); the paper gives no widths, both hidden widths are ``hidden``
    (default ``max(1, d // 2)``). Initialisation as ``nn.Linear`` / ``nn.LayerNorm``.
    Forward: :func:`msa_fast.ops.gated_attention_pool`; padded positions
    (``mask: (B, L)`` True) output 0. The last attention weights ``alpha (M, B, L)``
    and gates ``g (M, B, L)`` are kept, detached, as ``last_alpha`` / ``last_gate``.
    """

    def __init__(self, d: int, num_modalities: int = 3, hidden: int | None = None,
                 backend: str | None = None, eps: float = 1e-5) -> None:
        super().__init__()
        hidden = max(1, d // 2) if hidden is None else hidden
        m = num_modalities
        self.d, self.num_modalities, self.hidden, self.backend, self.eps = d, m, hidden, backend, eps
        self.ln_w = nn.Parameter(torch.ones(m, d))
        self.ln_b = nn.Parameter(torch.zeros(m, d))
        self.W1g = nn.Parameter(torch.empty(m, hidden, d))
        self.b1g = nn.Parameter(torch.empty(m, hidden))
        self.w2g = nn.Parameter(torch.empty(m, hidden))
        self.b2g = nn.Parameter(torch.empty(m))
        self.W1a = nn.Parameter(torch.empty(hidden, d))
        self.b1a = nn.Parameter(torch.empty(hidden))
        self.w2a = nn.Parameter(torch.empty(hidden))
        self.b2a = nn.Parameter(torch.empty(()))
        self.reset_parameters()
        self.last_alpha: torch.Tensor | None = None
        self.last_gate: torch.Tensor | None = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
        for p, fan_in in ((self.W1g, self.d), (self.b1g, self.d), (self.w2g, self.hidden),
                          (self.b2g, self.hidden), (self.W1a, self.d), (self.b1a, self.d),
                          (self.w2a, self.hidden), (self.b2a, self.hidden)):
            p.uniform_(-(fan_in**-0.5), fan_in**-0.5)
        self.ln_w.fill_(1.0)
        self.ln_b.zero_()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out, alpha, g = ops.gated_attention_pool(
            x, self.ln_w, self.ln_b, self.W1g, self.b1g, self.w2g, self.b2g,
            self.W1a, self.b1a, self.w2a, self.b2a, mask, self.eps, backend=self.backend)
        self.last_alpha, self.last_gate = alpha.detach(), g.detach()
        return out

    def extra_repr(self) -> str:
        return f"d={self.d}, num_modalities={self.num_modalities}, hidden={self.hidden}, backend={self.backend!r}"

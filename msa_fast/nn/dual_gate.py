"""``DualGateFusion``: AGFN's entropy + importance dual-gate fusion (contract §3.1) as a module."""

from __future__ import annotations

import torch
from torch import nn

from msa_fast import ops
from msa_fast.ops import _validate as V

ENTROPY_SOURCES = ("classes", "features")
RELEVANCE_INITS = ("normal", "zeros")


class DualGateFusion(nn.Module):
    """Fuse M modality vectors ``h: (..., M, D)`` into one ``(..., D)``.

    ``h_ent, h_imp_in, e, g, H = msa_fast.ops.dual_gate(h, u, w_z, b_z, g_logits, tau)``
    with ``g_logits = importance(concat_m h_m)``; ``h_imp = W_f(h_imp_in)``;
    ``fused = a * h_ent + (1 - a) * h_imp``, ``a = sigmoid(alpha)``.

    Entropy logits ``u`` (``entropy_source``):

    * ``"classes"`` (default): ``u_m = W_u[m] h_m + b_u[m]`` -> ``(..., M, C)``,
      ``C = num_classes`` (7 sentiment classes), per-modality weights ``W_u: (M, C, D)``,
      ``b_u: (M, C)`` (init ``U(-1/sqrt(D), 1/sqrt(D))``, as ``nn.Linear``). The owner
      trains them with an auxiliary cross-entropy on :attr:`entropy_logits` (AGFN adds
      ``lambda_u * CE(u_m, sentiment_classes(y, "7"))``), so that ``softmax(u_m)`` says how
      sure modality m alone is; untrained, ``H`` is just a function of ``h``.
    * ``"features"``: ``u = h`` (``C = D``), the softmax of the features themselves
      (``num_classes`` unused).

    Parameters: ``w_z: (M, D)`` (``relevance_init="normal"``: ``N(0, 1/D)``, so that ``z``
    starts O(1); ``"zeros"``: 0, so that every modality starts with the same relevance
    logit and the entropy gate starts as ``softmax(-H / tau)``: no modality is favoured by
    the draw), ``b_z: (M,)`` (zeros); ``importance`` = Linear(M*D, hidden) - GELU - Dropout -
    Linear(hidden, M) (the contract leaves the activation open: GELU, as the rest of
    the library); ``W_f`` = ``nn.Linear(M*D, D)`` (with bias); ``alpha`` a scalar,
    initialised to 0 (``a = 0.5``). ``dropout`` acts on the importance MLP's hidden
    layer and on the fused output (train mode only). ``num_classes >= 2``: one class
    has no entropy to gate on.

    After each forward: ``last_weights = (e, g, H)``, each ``(..., M)``, detached (for
    plots and fidelity scripts), and ``entropy_logits`` = that forward's ``u``
    ``(..., M, C)``, with its graph (for the auxiliary loss).
    ``backend`` is passed to :func:`msa_fast.ops.dual_gate` (``None``: global default).
    """

    def __init__(self, dim: int, num_modalities: int = 3, tau: float = 0.5, hidden: int | None = None,
                 dropout: float = 0.0, entropy_source: str = "classes", num_classes: int = 7,
                 backend: str | None = None, relevance_init: str = "normal") -> None:
        super().__init__()
        name = "DualGateFusion"
        V.positive_int(name, "dim", dim)
        V.positive_int(name, "num_modalities", num_modalities)
        V.positive_float(name, "tau", tau)
        V.choice(name, "entropy_source", entropy_source, ENTROPY_SOURCES)
        V.choice(name, "relevance_init", relevance_init, RELEVANCE_INITS)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            V.fail(name, "num_classes", "an int >= 2", repr(num_classes))
        hidden = dim if hidden is None else hidden
        self.dim, self.num_modalities, self.tau, self.backend = dim, num_modalities, float(tau), backend
        self.entropy_source = entropy_source
        self.num_classes = num_classes if entropy_source == "classes" else dim
        w_z = torch.randn(num_modalities, dim) * dim**-0.5 if relevance_init == "normal" else \
            torch.zeros(num_modalities, dim)
        self.w_z = nn.Parameter(w_z)
        self.b_z = nn.Parameter(torch.zeros(num_modalities))
        if entropy_source == "classes":
            bound = dim**-0.5
            self.W_u = nn.Parameter(torch.empty(num_modalities, num_classes, dim).uniform_(-bound, bound))
            self.b_u = nn.Parameter(torch.empty(num_modalities, num_classes).uniform_(-bound, bound))
        self.importance = nn.Sequential(
            nn.Linear(num_modalities * dim, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_modalities))
        self.W_f = nn.Linear(num_modalities * dim, dim)
        self.alpha = nn.Parameter(torch.zeros(()))
        self.dropout = nn.Dropout(dropout)
        self.last_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.entropy_logits: torch.Tensor | None = None

    def entropy_logits_of(self, h: torch.Tensor) -> torch.Tensor:
        """``u: (..., M, C)`` for ``h: (..., M, D)`` (see the class docstring)."""
        if self.entropy_source == "features":
            return h
        # one (C, D) matrix per modality: a batched GEMM over the modality axis
        return torch.einsum("...md,mcd->...mc", h, self.W_u) + self.b_u

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not isinstance(h, torch.Tensor) or h.dim() < 2 or tuple(h.shape[-2:]) != (self.num_modalities, self.dim):
            V.fail("DualGateFusion", "h", f"a tensor of shape (..., {self.num_modalities}, {self.dim})", h)
        u = self.entropy_logits_of(h)
        g_logits = self.importance(h.flatten(-2))
        h_ent, h_imp_in, e, g, H = ops.dual_gate(h, u, self.w_z, self.b_z, g_logits, self.tau,
                                                 backend=self.backend)
        a = torch.sigmoid(self.alpha)
        fused = a * h_ent + (1 - a) * self.W_f(h_imp_in)
        self.last_weights = (e.detach(), g.detach(), H.detach())
        self.entropy_logits = u
        return self.dropout(fused)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_modalities={self.num_modalities}, tau={self.tau}, "
                f"entropy_source={self.entropy_source!r}, num_classes={self.num_classes}, "
                f"backend={self.backend!r}")

"""``FDCMDIEContrastiveLoss``: the FD-CMDIE contrastive loss ``L_cl`` (eq. 9-12) as a module.

Partners (the mined ``similar^i`` / ``different^i`` of section 2.3.2) come from one
of two sources:

* ``partner_source="forward"`` (faithful): the caller runs the encoders on the
  partners too and passes their features; gradients flow into them.
* ``partner_source="bank"`` (fast; the default for MOSEI in contract §3.4): the module
  keeps a detached memory bank ``bank (N, 2, 3, D)`` -- ``[:, 0]`` the similarity
  features ``[T_s, A_s, V_s]``, ``[:, 1]`` the dissimilarity features
  ``[T_d, A_d, V_d]`` of every training sample -- and ``filled (N,)`` (True once a
  row was written). Rows are refreshed as samples pass (:meth:`update`, and
  :meth:`forward` in training mode when ``indices`` is given); the forward takes
  mined partner indices and gathers the partners' features from the bank
  (no gradient into partners, as in any memory bank).

Both are registered buffers: they follow ``.to(device / dtype)`` and are saved in
the ``state_dict`` unless ``persistent=False`` (a model whose checkpoints should not
carry an ``N``-row bank, and which may be built before ``N`` is known, e.g.
:class:`msa_fast.models.fd_cmdie.FDCMDIE`).
"""

from __future__ import annotations

import torch
from torch import nn

from msa_fast.ops import _validate as V
from msa_fast.ops.contrastive import fd_cmdie_contrastive_loss

__all__ = ["FDCMDIEContrastiveLoss"]

_SOURCES = ("forward", "bank")
_NAME = "FDCMDIEContrastiveLoss"


class FDCMDIEContrastiveLoss(nn.Module):
    """FD-CMDIE contrastive loss with partners from the forward pass or a memory bank.

    Args:
        num_samples: ``N``, the training-set size (required for ``"bank"``).
        dim: ``D``, the feature width (required for ``"bank"``).
        tau, margin, lambda_tri: eq. 9, 10 and 12 (see
            :func:`msa_fast.ops.reference.fd_cmdie_contrastive_loss`).
        partner_source: ``"forward"`` or ``"bank"`` (module docstring).
        backend: passed to :func:`msa_fast.ops.fd_cmdie_contrastive_loss`.
        persistent: whether ``bank`` / ``filled`` are part of the ``state_dict``.

    ``forward`` with ``partner_source="forward"``::

        loss(sim_feats (B, 3, D), diff_feats (B, 3, D),
             pos_partner_feats=(B, Kp, 2, 3, D), neg_partner_feats=(B, Kn, 3, D),
             pos_partner_mask=None | (B, Kp) bool, neg_partner_mask=None | (B, Kn) bool)

    ``forward`` with ``partner_source="bank"``::

        loss(sim_feats (B, 3, D), diff_feats (B, 3, D),
             pos_idx=(B, Kp) int64, neg_idx=(B, Kn) int64, indices=None | (B,) int64)

    ``pos_idx`` / ``neg_idx`` are rows of the bank (``mine_pairs`` output; ``-1`` =
    missing). A partner is used when its index is ``>= 0`` and its bank row is
    filled. When ``indices`` (the batch's own rows) is given and the module is in
    training mode, the batch's features are written to the bank first, so a
    partner that is in the batch is seen with its current (detached) features.
    Returns the scalar ``L_cl`` (eq. 12).
    """

    def __init__(
        self,
        num_samples: int | None = None,
        dim: int | None = None,
        tau: float = 0.5,
        margin: float = 0.5,
        lambda_tri: float = 0.1,
        partner_source: str = "forward",
        backend: str | None = None,
        persistent: bool = True,
    ) -> None:
        super().__init__()
        self.partner_source = V.choice(_NAME, "partner_source", partner_source, _SOURCES)
        V.positive_float(_NAME, "tau", tau)
        if isinstance(lambda_tri, bool) or not isinstance(lambda_tri, (int, float)) or not lambda_tri >= 0:
            V.fail(_NAME, "lambda_tri", "a float >= 0", repr(lambda_tri))
        self.tau, self.margin, self.lambda_tri = float(tau), float(margin), float(lambda_tri)
        self.backend = backend
        self.num_samples, self.dim = num_samples, dim
        if partner_source == "bank":
            if num_samples is None:
                V.fail(_NAME, "num_samples", "an int >= 1 with partner_source='bank'", "None")
            if dim is None:
                V.fail(_NAME, "dim", "an int >= 1 with partner_source='bank'", "None")
            V.positive_int(_NAME, "num_samples", num_samples)
            V.positive_int(_NAME, "dim", dim)
            self.register_buffer("bank", torch.zeros(num_samples, 2, 3, dim), persistent=persistent)
            self.register_buffer("filled", torch.zeros(num_samples, dtype=torch.bool), persistent=persistent)

    def extra_repr(self) -> str:
        bank = f", num_samples={self.num_samples}, dim={self.dim}" if self.partner_source == "bank" else ""
        return (f"partner_source={self.partner_source!r}{bank}, tau={self.tau}, margin={self.margin}, "
                f"lambda_tri={self.lambda_tri}")

    def _require_bank(self, what: str) -> None:
        if self.partner_source != "bank":
            raise RuntimeError(f"{_NAME}.{what} needs partner_source='bank' (got {self.partner_source!r})")

    def _check_index(self, name: str, idx: object, shape: tuple[int | None, ...], allow_missing: bool) -> None:
        V.tensor(_NAME, name, idx, shape=shape, dtypes=(torch.int64,), layout="int64")
        if idx.device != self.bank.device:
            V.fail(_NAME, name, f"device {self.bank.device} (the bank's)", idx)
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            low = -1 if allow_missing else 0
            if lo < low or hi >= self.num_samples:
                V.fail(_NAME, name, f"values in [{low}, {self.num_samples - 1}]", f"range [{lo}, {hi}]")

    @torch.no_grad()
    def update(self, indices: torch.Tensor, sim_feats: torch.Tensor, diff_feats: torch.Tensor) -> None:
        """Write the batch's features, detached, into bank rows ``indices (B,)`` and mark them filled.

        ``sim_feats (B, 3, D)`` = ``[T_s, A_s, V_s]``, ``diff_feats (B, 3, D)`` =
        ``[T_d, A_d, V_d]``; cast to the bank's dtype and device. Indices should be
        distinct: with repeats, which write wins is unspecified (``index_copy_``).
        """
        self._require_bank("update")
        b = indices.shape[0] if isinstance(indices, torch.Tensor) and indices.dim() == 1 else None
        self._check_index("indices", indices, (b,), allow_missing=False)
        V.tensor(_NAME, "sim_feats", sim_feats, shape=(indices.shape[0], 3, self.dim), layout="(B, 3, D)")
        V.tensor(_NAME, "diff_feats", diff_feats, shape=(indices.shape[0], 3, self.dim), like=sim_feats,
                 layout="(B, 3, D)")
        rows = torch.stack([sim_feats, diff_feats], dim=1).to(device=self.bank.device, dtype=self.bank.dtype)
        self.bank.index_copy_(0, indices, rows)
        self.filled.index_fill_(0, indices, True)

    def gather(self, pos_idx: torch.Tensor, neg_idx: torch.Tensor):
        """Partner features and masks from the bank, shaped for the op.

        Returns ``(pos_partner_feats (B, Kp, 2, 3, D), neg_partner_feats (B, Kn, 3, D),
        pos_partner_mask (B, Kp), neg_partner_mask (B, Kn))``; missing (``-1``) or
        unfilled partners are masked out (their slots hold row 0, a finite value).
        """
        self._require_bank("gather")
        self._check_index("pos_idx", pos_idx, (None, None), allow_missing=True)
        self._check_index("neg_idx", neg_idx, (pos_idx.shape[0], None), allow_missing=True)
        pos_safe, neg_safe = pos_idx.clamp_min(0), neg_idx.clamp_min(0)
        pos_mask = (pos_idx >= 0) & self.filled[pos_safe]
        neg_mask = (neg_idx >= 0) & self.filled[neg_safe]
        return self.bank[pos_safe], self.bank[neg_safe, 0], pos_mask, neg_mask

    def forward(
        self,
        sim_feats: torch.Tensor,
        diff_feats: torch.Tensor,
        pos_partner_feats: torch.Tensor | None = None,
        neg_partner_feats: torch.Tensor | None = None,
        pos_partner_mask: torch.Tensor | None = None,
        neg_partner_mask: torch.Tensor | None = None,
        *,
        pos_idx: torch.Tensor | None = None,
        neg_idx: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.partner_source == "forward":
            for name, v in (("pos_partner_feats", pos_partner_feats), ("neg_partner_feats", neg_partner_feats)):
                if v is None:
                    V.fail(_NAME, name, "a tensor with partner_source='forward'", "None")
            for name, v in (("pos_idx", pos_idx), ("neg_idx", neg_idx), ("indices", indices)):
                if v is not None:
                    V.fail(_NAME, name, "None with partner_source='forward' (pass partner features)", "a tensor")
        else:
            for name, v in (("pos_partner_feats", pos_partner_feats), ("neg_partner_feats", neg_partner_feats),
                            ("pos_partner_mask", pos_partner_mask), ("neg_partner_mask", neg_partner_mask)):
                if v is not None:
                    V.fail(_NAME, name, "None with partner_source='bank' (pass pos_idx / neg_idx)", "a tensor")
            for name, v in (("pos_idx", pos_idx), ("neg_idx", neg_idx)):
                if v is None:
                    V.fail(_NAME, name, "an int64 tensor with partner_source='bank'", "None")
            if indices is not None and self.training:
                self.update(indices, sim_feats, diff_feats)
            pos_partner_feats, neg_partner_feats, pos_partner_mask, neg_partner_mask = self.gather(pos_idx, neg_idx)
            pos_partner_feats = pos_partner_feats.to(sim_feats.dtype)
            neg_partner_feats = neg_partner_feats.to(sim_feats.dtype)
        return fd_cmdie_contrastive_loss(
            sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, self.tau, self.margin,
            self.lambda_tri, pos_partner_mask, neg_partner_mask, backend=self.backend)

"""AGFN: Adaptive Gated Fusion Network (Wu et al., 2025, arXiv 2510.01677; contract §3.1, 4).

Pipeline, per batch (``B`` samples, modalities t, a, v in that order):

1. **Unimodal encoders** (shared with the baselines, :mod:`msa_fast.models.encoders`):
   text from 768-d features (``GELU(W x)`` per token) or a local Hugging Face model
   (``text_model``); audio and vision through sLSTMs over packed lengths. Each sequence
   is projected to the common width ``d`` by its own ``Linear``:
   ``X_m: (B, L_m, d)``, padded positions 0.
2. **Cross-modal attention**, one block per target modality m (own weights): the
   queries are ``X_m``; the keys / values are the other two modalities concatenated in
   time, ``K_m = [X_n ; X_k]: (B, L_n + L_k, d)``, with the concatenated padding masks
   (True = padding), so unaligned data with different lengths works unchanged.
   ``Y_m = LN(X_m + Dropout(W_o MHA(W_q X_m, W_k K_m, W_v K_m)))`` then, when
   ``ffn_dim > 0``, ``Z_m = LN(Y_m + Dropout(FFN(Y_m)))`` with
   ``FFN = Linear(d, ffn_dim) - GELU - Dropout - Linear(ffn_dim, d)``.
   The attention is :func:`msa_fast.ops.attention` and each residual + LayerNorm is
   :func:`msa_fast.ops.add_layer_norm`, so ``--backend`` changes speed, not results.
3. **Utterance vectors**: ``U_m = masked_mean_L(Z_m)`` over valid positions -> ``U: (B, 3, d)``.
4. **Dual-gate fusion**: :class:`msa_fast.nn.DualGateFusion` (entropy gate + importance
   gate, contract §3.1) -> ``(B, d)``. With ``entropy_source="classes"`` (default) each
   modality predicts the 7 sentiment classes from its own utterance vector,
   ``u_m = W_u[m] U_m + b_u[m]``, and the entropy gate weighs modality m by
   ``e = softmax_m(z_m - H_m / tau)``, ``H_m`` the normalised entropy of ``softmax(u_m)``:
   an unsure modality (flat ``q_m``) loses weight whatever the sign of ``z_m``.
   ``last_weights = (e, g, H)`` hold the clean pass's gate weights and entropies (the VAT
   passes do not overwrite them).
5. **Head**: ``Linear(d, hidden) - ReLU - Dropout - Linear(hidden, 1)`` -> ``pred (B,)``.
   The trainer adds the L1 loss.
6. **Auxiliary entropy-logit loss** (training mode, ``entropy_source="classes"``,
   ``lambda_u > 0``): ``loss_extra += lambda_u * mean_{(b, m) present}
   CE(u_{b,m}, sentiment_classes(y_b, "7"))`` (class ids 0..6 = ``round(clip(y)) + 3``).
   It is what makes ``q_m`` a per-modality confidence; without it ``H`` would be an
   arbitrary function of the features. A dropped modality (``present`` False) is masked
   out of the mean: its zero vector carries no evidence and must not be trained to
   predict the label (its ``u_m`` is then the constant ``b_u[m]``, whose entropy no loss
   term sets: the drop is handled by the masking of step 2, not by the gate).

Missing modalities (``batch["present"] (B, 3)`` False, the MPLMM drop protocol): the
dropped modality's input features are zeroed (the protocol already does so; repeated here
so a caller's own batches are safe), its positions are masked out of every key set, and
its utterance vector is set to 0 (the dual gate then sees ``u_m = b_u[m]`` and the
relevance logit ``z_m = b_z[m]``), and its auxiliary CE term is masked.
A target whose keys are all masked (both other modalities dropped) gets an attention
output of exactly 0 (the op's rule), i.e. ``Y_m = LN(X_m)``: never NaN.

**Virtual adversarial training** (``vat=True``, training mode only): the utterance
vectors ``U`` are perturbed in the adversarial direction found by one power iteration
(Miyato et al., 2018): ``r0 = xi * normalize(N(0, I))`` per sample (norm over the
``3 x d`` entries), ``D(r) = mean_b (f(U + r) - f(U))^2`` with ``f`` = fusion + head and
``f(U)`` detached, ``r_adv = eps * normalize(grad_r D(r0))``; the penalty
``vat_weight * D(r_adv)`` is added to ``loss_extra`` (gradient through ``U`` too, so the encoders are
regularised as well as the fusion). Squared difference is the divergence because the
output is a regression value, not a distribution.

Formulation choices where the paper (or its summary) is vague:

- Cross-modal interaction: one attention per target over the *concatenation* of the other
  two modalities (rather than two separate attentions and a sum), one layer, own weights
  per target; no positional encoding (the sLSTMs encode order for a / v, and the text
  features come from a positional BERT).
- Utterance vector = masked mean over time of the interaction output (not the
  first / last token).
- The entropy / importance gates, ``W_f`` and the mixing scalar ``alpha`` are exactly
  contract §3.1's (:class:`~msa_fast.nn.DualGateFusion`, ``tau`` configurable). The paper's
  entropy gate "suppresses noisy modalities" without saying of which distribution the
  entropy is taken: here of a per-modality 7-class sentiment prediction
  (``entropy_source="classes"``, trained by the auxiliary CE), so that the entropy
  measures how sure modality m alone is; ``"features"`` (the softmax of the utterance
  vector itself, no auxiliary loss) is kept as an option. The entropy is subtracted
  from the relevance logit (``z - H / tau``), so that more entropy always means less
  weight. (v1 of this library multiplied the logit by ``exp(-H / tau)`` and took the
  entropy of the LayerNormed features: nearly constant, and it raised the weight of a
  negative-logit modality; the fidelity results labelled v1 were measured with it.)
- The auxiliary CE averages over present (sample, modality) pairs, i.e. ``mean_m`` of the
  per-modality means when nothing is dropped.
- The loss is L1 (MMSA's regression loss) plus the auxiliary CE; VAT is an optional extra
  term, off by default; its divergence, perturbation site (utterance vectors) and one
  power iteration are ours.
- Dropout (``dropout``) acts on the text features, attention and FFN outputs, inside the
  FFN, in the dual gate's importance MLP and output, and in the head.

Hyper-parameters (``cfg``; unknown keys ignored): ``d`` 32, ``heads`` 4, ``ffn_dim`` 64
(0 disables the FFN), ``hidden`` 64 (text encoder width and head width), ``av_hidden`` 32,
``lstm_layers`` 1, ``dropout`` 0.1, ``tau`` 0.05 (the dual gate's own default is contract §3.1's
0.5; see below), ``gate_hidden`` (default ``d``),
``entropy_source`` ``"classes"`` (or ``"features"``), ``lambda_u`` 0.1 (weight of the
auxiliary CE; 0 disables it; unused with ``"features"``), ``gate_init`` ``"normal"`` (or
``"zeros"``: the relevance weights ``w_z`` of :class:`~msa_fast.nn.DualGateFusion` start
at 0; issue 22's gate-spread experiment), ``vat`` False, ``vat_eps`` 1.0, ``vat_xi`` 1e-3, ``vat_weight`` 1.0, ``backend`` None
(the global default), and the text-encoder options of the baselines (``text_model``,
``text_trust_remote_code``, ``text_finetune``). Defaults are sized for a CPU run on
``synthetic:mosi``.

Why ``tau`` 0.05. A 7-class head on one modality is never sure on this kind of data
(normalised entropy ``H`` about 0.9 on clean and corrupted samples alike), so at 0.5 the
entropy term ``-H / tau`` hardly moves the weights: on ``synthetic:mosi:pid`` (3 seeds,
``python experiments/fidelity_pid.py train agfn agfn_tau0.5 ...``, ``report``) the margin
``e_clean - e_corrupted`` of every modality stayed within the seed spread at 0.5 (text
0.033 vs spread 0.063), while at 0.05 it exceeds the spread for text (0.113 vs 0.081) and
audio (0.042 vs 0.028), not vision (0.027 vs 0.084), and the test MAE is lower (0.977 ±
0.023 against 1.016 ± 0.009). Runs written before the change load with 0.5
(:data:`msa_fast.models.PREVIOUS_DEFAULTS`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from msa_fast.models import register_model
from msa_fast.models.encoders import SLSTMEncoder, build_text_encoder, encode_text, masked_mean
from msa_fast.nn.attention import AddNorm, MultiheadAttention
from msa_fast.nn.dual_gate import ENTROPY_SOURCES, DualGateFusion
from msa_fast.ops import _validate as V
from msa_fast.ops._common import sentiment_classes

__all__ = ["AGFN", "CrossModalBlock"]

MODALITIES = ("text", "audio", "vision")
_OP = "AGFN"


def _fail(name: str, expected: str, got: object) -> None:
    V.fail(_OP, name, expected, repr(got))


_int = functools.partial(V.config_int, _OP)
_float = functools.partial(V.config_float, _OP)


class CrossModalBlock(nn.Module):
    """One target modality attending to a key set: residual + LN, then an optional FFN.

    ``forward(x (B, Lq, d), kv (B, Lk, d), kv_mask (B, Lk) bool True = padding) ->
    (B, Lq, d)``: ``y = AddNorm(Dropout(W_o MHA(x W_Q, kv W_K, kv W_V)), x)`` with
    :class:`msa_fast.nn.MultiheadAttention` (``attn``; queries and keys / values projected
    separately) and :class:`msa_fast.nn.AddNorm` (``norm1``), then ``AddNorm(Dropout(FFN(y)),
    y)`` (``norm2``) when ``ffn_dim > 0``. ``kv_mask`` rows that are all True give a zero
    attention output.
    """

    def __init__(self, d: int, heads: int, ffn_dim: int, dropout: float, backend: str | None = None,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.d, self.heads, self.backend, self.eps = d, heads, backend, eps
        self.attn = MultiheadAttention(d, heads, dropout=dropout, backend=backend)
        self.norm1 = AddNorm(d, eps=eps, backend=backend)
        self.ffn = None
        if ffn_dim > 0:
            self.ffn = nn.Sequential(nn.Linear(d, ffn_dim), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(ffn_dim, d))
            self.norm2 = AddNorm(d, eps=eps, backend=backend)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
        y = self.norm1(self.attn(x, kv, kv_mask), x)
        if self.ffn is not None:
            y = self.norm2(self.dropout(self.ffn(y)), y)
        return y


@register_model("agfn")
class AGFN(nn.Module):
    """AGFN for regression; see the module docstring for the architecture and every choice."""

    def __init__(self, dims: dict, d: int = 32, heads: int = 4, ffn_dim: int = 64, hidden: int = 64,
                 av_hidden: int = 32, lstm_layers: int = 1, dropout: float = 0.1, tau: float = 0.05,
                 gate_hidden: int | None = None, entropy_source: str = "classes", lambda_u: float = 0.1,
                 gate_init: str = "normal", vat: bool = False, vat_eps: float = 1.0,
                 vat_xi: float = 1e-3, vat_weight: float = 1.0, backend: str | None = None,
                 text_model: str | None = None, text_trust_remote_code: bool = False,
                 text_finetune: bool = True, **_):
        super().__init__()
        d, heads = _int("d", d, 1), _int("heads", heads, 1)
        if d % heads:
            _fail("heads", f"a divisor of d = {d}", heads)
        _int("ffn_dim", ffn_dim, 0)
        _int("hidden", hidden, 1)
        _int("av_hidden", av_hidden, 1)
        _int("lstm_layers", lstm_layers, 1)
        if gate_hidden is not None:
            _int("gate_hidden", gate_hidden, 1)
        dropout = _float("dropout", dropout, 0.0, 1.0)
        tau = _float("tau", tau, 0.0, low_open=True)
        if entropy_source not in ENTROPY_SOURCES:
            _fail("entropy_source", f"one of {ENTROPY_SOURCES}", entropy_source)
        self.lambda_u = _float("lambda_u", lambda_u, 0.0)
        self.entropy_source = entropy_source
        if not isinstance(vat, bool):
            _fail("vat", "a bool", vat)
        self.vat_eps = _float("vat_eps", vat_eps, 0.0, low_open=True)
        self.vat_xi = _float("vat_xi", vat_xi, 0.0, low_open=True)
        self.vat_weight = _float("vat_weight", vat_weight, 0.0)
        self.vat, self.d = vat, d

        self.text = build_text_encoder(dims, hidden, dropout, text_model, text_trust_remote_code,
                                       text_finetune)
        self.audio = SLSTMEncoder(dims["audio"], av_hidden, lstm_layers, dropout)
        self.vision = SLSTMEncoder(dims["vision"], av_hidden, lstm_layers, dropout)
        self.proj = nn.ModuleList(nn.Linear(enc.out_dim, d) for enc in (self.text, self.audio, self.vision))
        self.cross = nn.ModuleList(CrossModalBlock(d, heads, ffn_dim, dropout, backend) for _ in MODALITIES)
        self.fusion = DualGateFusion(d, 3, tau=tau, hidden=gate_hidden, dropout=dropout,
                                     entropy_source=entropy_source, num_classes=7, backend=backend,
                                     relevance_init=gate_init)
        self.head = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    # -- pieces -------------------------------------------------------------------------

    def _sequences(self, batch: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Projected unimodal sequences ``X_m (B, L_m, d)`` (padding and dropped modalities 0)
        and their key masks (True = padding or modality dropped)."""
        present = batch.get("present")
        masks = [batch[f"{m}_mask"] for m in MODALITIES]
        inputs = {}
        for i, m in enumerate(MODALITIES):
            key = "text_bert" if m == "text" and "text" not in batch else m
            x = batch[key]
            if present is not None and x.is_floating_point():
                x = x * present[:, i].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
            inputs[key] = x
        t_seq, _ = encode_text(self.text, dict(batch, **inputs))
        a_seq, _ = self.audio(inputs["audio"], masks[1])
        v_seq, _ = self.vision(inputs["vision"], masks[2])
        seqs = []
        for i, (proj, s) in enumerate(zip(self.proj, (t_seq, a_seq, v_seq))):
            x = proj(s).masked_fill(masks[i][..., None], 0.0)
            seqs.append(x)
        if present is not None:
            masks = [mk | ~present[:, i, None] for i, mk in enumerate(masks)]
        return seqs, masks

    def utterance_vectors(self, batch: dict) -> torch.Tensor:
        """``U: (B, 3, d)``, one vector per modality after the cross-modal attention."""
        seqs, key_masks = self._sequences(batch)
        pad = [batch[f"{m}_mask"] for m in MODALITIES]
        us = []
        for i, block in enumerate(self.cross):
            j, k = [n for n in range(3) if n != i]
            kv = torch.cat([seqs[j], seqs[k]], dim=1)
            kv_mask = torch.cat([key_masks[j], key_masks[k]], dim=1)
            us.append(masked_mean(block(seqs[i], kv, kv_mask), pad[i]))
        U = torch.stack(us, dim=1)
        present = batch.get("present")
        if present is not None:
            U = U * present.to(U.dtype)[..., None]
        return U

    def predict_from_utterances(self, U: torch.Tensor) -> torch.Tensor:
        return self.head(self.fusion(U)).squeeze(-1)

    def _vat_loss(self, U: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        def normalize(r: torch.Tensor) -> torch.Tensor:
            return r / r.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1)

        target = pred.detach()
        clean_weights, clean_logits = self.fusion.last_weights, self.fusion.entropy_logits
        r = (self.vat_xi * normalize(torch.randn_like(U))).requires_grad_(True)
        with torch.enable_grad():
            dist = (self.predict_from_utterances(U.detach() + r) - target).pow(2).mean()
            (grad,) = torch.autograd.grad(dist, r)
        r_adv = self.vat_eps * normalize(grad.detach())
        loss = (self.predict_from_utterances(U + r_adv) - target).pow(2).mean()
        self.fusion.last_weights, self.fusion.entropy_logits = clean_weights, clean_logits
        return self.vat_weight * loss

    def entropy_logit_loss(self, u: torch.Tensor, labels: torch.Tensor, present: torch.Tensor | None
                           ) -> torch.Tensor:
        """Unweighted auxiliary CE: mean over present (sample, modality) pairs of
        ``CE(u[b, m], sentiment_classes(labels[b], "7"))``; ``u: (B, 3, 7)``. 0 when no pair
        is present."""
        B, M, C = u.shape
        target = sentiment_classes(labels.detach(), "7").to(u.device)
        ce = nn.functional.cross_entropy(u.float().reshape(B * M, C), target.repeat_interleave(M),
                                         reduction="none").view(B, M)
        if present is None:
            return ce.mean()
        keep = present.to(ce.dtype)
        return (ce * keep).sum() / keep.sum().clamp(min=1.0)

    # -- interface -----------------------------------------------------------------------

    @staticmethod
    def upgrade_state_dict(state: dict) -> dict:
        """Checkpoints from before the contract §3.1 dual gate (commit d82b6f3 and earlier, recognised by
        ``cross.0.q_proj.weight``) cannot be mapped: their gate computed another function (no
        class-entropy logits ``W_u``), so this raises instead of loading something else."""
        if "cross.0.q_proj.weight" in state:
            raise ValueError("an AGFN checkpoint from before the contract §3.1 dual gate (msa_fast at "
                             "commit d82b6f3 or earlier): its gate computes another function and "
                             "cannot be upgraded; retrain it with this version")
        return state

    def forward(self, batch: dict) -> dict:
        U = self.utterance_vectors(batch)
        pred = self.predict_from_utterances(U)
        out = {"pred": pred}
        if not self.training:
            return out
        extra = []
        if self.entropy_source == "classes" and self.lambda_u > 0 and "labels" in batch:
            loss_u = self.entropy_logit_loss(self.fusion.entropy_logits, batch["labels"], batch.get("present"))
            out["loss_u"] = loss_u.detach()
            extra.append(self.lambda_u * loss_u)
        if self.vat:
            extra.append(self._vat_loss(U, pred))
        if extra:
            out["loss_extra"] = sum(extra[1:], extra[0])
        return out

"""ProMMA: prompt-based missing-modality adaptation (paper 002, contract §4), ``--model promma``.

The paper is available to us only as a summary, so contract §4 decides what is built; every
formulation choice below is ours and is stated as such.

Pipeline (``d = hidden``, ``Lp = prompt_len``, ``Lg = gen_len``, ``s = stride``, streams
m = t, a, v):

0. **Encoders.** Text: :func:`~msa_fast.models.encoders.build_text_encoder` (768-d features
   -> ``GELU(W x)``, or a local Hugging Face encoder on ``text_bert``; no dropout on the
   768-d input, whose Bernoulli draw alone cost about as much as the backbone on a CPU);
   audio / vision: :class:`~msa_fast.models.encoders.SLSTMEncoder` over the full sequence,
   then ``Linear(av_hidden, d)``. Each encoded sequence is averaged over non-overlapping
   windows of ``s`` steps (valid steps only; default ``s = 4``, ``s = 1`` keeps every step --
   a CPU-cost choice: attention work falls with ``(L / s)^2``), gets the fixed sinusoidal
   position encoding, and is right-padded to the longest of the three, so that the three
   streams are stacked ``(3, B, L, d)`` and every attention runs as one batched call.

1. **Missing Modality Evaluator (MME).** ``absent_m = pad_m | ~present[:, m]`` (the drop
   protocol clears ``batch["present"]``; its zeroed features are never attended to).
   *Unimodal predictors* ``f_m`` (``Linear-ReLU-Linear`` on the masked mean of ``X_m``) give
   pseudo-labels ``y_m``; they are trained with ``L_uni = mean |f_m - y|`` over the present
   (sample, modality) pairs, inside ``loss_extra`` (their gradient also reaches the encoders:
   a multi-task signal; the paper's "pre-trained models" are trained jointly here).
   *Generation*: every modality ``m`` is generated from the present others by prompt-
   conditioned cross-attention: ``Lg`` learned generative prompt tokens ``Q_m`` are the
   queries, the concatenated present tokens of the other two modalities (plus a learned
   source embedding) the keys / values: ``G_m = LN(Q_m + Attn(Q_m, [X_j; X_k]))`` ``(B, Lg, d)``.
   It is trained by ``L_gen = || mean(G_m) - sg(masked_mean(X_m)) ||^2`` (mean over d) on
   the samples where ``m`` is present and at least one other modality is (``sg`` =
   stop-gradient), i.e. by reconstructing modalities that are there.
   *Evaluation*: for a missing ``m`` the generated tokens are scored by the same unimodal
   predictor, ``y^gen_m = f_m(mean(G_m))``, and compared with the pseudo-label of the present
   modalities ``y~ = mean_{k present} y_k``. "Informative" is read as "consistent with the
   pseudo-labels": ``m`` is imputed iff ``|y^gen_m - y~| <= eval_threshold`` (label units,
   default 1.0 on MOSI's [-3, 3]); otherwise it is dropped (its tokens stay masked and only
   its prompts represent it). The decision is a hard, non-differentiable selection; the
   generator learns from ``L_gen`` alone. ``impute="always"`` imputes every missing modality
   (generation without evaluation), ``"never"`` drops every missing modality (prompts only).
   A sample with nothing present imputes nothing. ``last_stats["imputed"]`` is the fraction
   of missing (sample, modality) slots imputed in the last forward (a 0-dim tensor, NaN when
   nothing was missing: the forward never reads a value back to the host).

2. **Modality-invariant Prompt Disentanglement (MPD).** One shared prompt ``P_s (Lp, d)``
   plus a learned *missing-signal* prompt ``E_m (Lp, d)`` for each missing modality of the
   sample: ``P_s[b] = P_s + sum_{m missing in b} E_m`` (the "prompts for missing
   modalities"). Private prompts are a per-modality linear map of the shared one,
   ``R_m[b] = P_s[b] W_m + c_m``, and stream ``m`` is prefixed with ``P_m[b] = P_s[b] +
   R_m[b]`` (shared + private). Disentanglement is a MISA-style soft orthogonality loss on
   row-normalised token matrices, ``L_orth = mean_b sum_{(A, B)} ||A_b B_b^T||_F^2 / Lp^2``
   over the pairs (shared, private_m) and (private_m, private_n). ``disentangle=False``:
   each modality has its own independent prompt ``Q_m + sum E`` and no ``L_orth``.
   Stream ``m`` of the backbone is ``[P_m ; X_m ; G_m]`` (length ``Lp + L + Lg``) with mask
   ``[False ; absent_m ; ~imputed_m]``: prompt tokens are never masked, so no attention in
   the backbone of the prompted model has an empty key set.

3. **Dynamic Prompt Weighting (DPW).** In each backbone layer, target stream ``i`` attends
   to each other stream ``j`` (``C_ij``, with ``j``'s keys and mask). The two outputs are
   combined as ``sum_j w_ij C_ij`` with ``w_i. = softmax_j(beta_{l,i} * I_ij)``. ``I_ij`` is a
   per-sample mutual-information estimate between the target stream and what it retrieved:
   an InfoNCE (van den Oord et al. 2018) bilinear critic ``T_i(x, c) = x^T W_i c / sqrt(d)``
   on the masked means ``x = mean(X_i)``, ``c = mean(C_ij)``, shared by both sources of
   target ``i``. The critic is an *estimator*: it is trained only by its InfoNCE loss
   ``L_mi = CE(T_i(x_b, c_b'), b)`` over the batch (in-batch negatives, mean over layers and
   the six pairs) on detached inputs, and the weights use the detached matched-pair score
   ``I_ij[b] = T_i(x_b, c_b)`` -- the batch-free critic value, so that a sample's prediction
   never depends on its batch-mates (the log-partition term of the bound needs the batch
   and is left out). The sharpness ``beta`` (init 1) is learned by the task loss.
   ``dynamic_weighting=False``: ``w = 1/2``.

4. **Multi-level Prompt Dynamic Connection (MPDC).** In the layers ``connect_layers``
   (default: all), the self-attention output of every stream gets a residual read-out of
   the shared prompt: ``S_i <- S_i + Attn(S_i W_q, P_s W_k, P_s W_v) W_o`` (one set of
   projections per layer, shared by the streams), before the residual + LayerNorm.
   ``connection=False`` (or ``connect_layers=[]``) turns it off.

**Backbone** (``layers`` layers, per stream ``i``, own weights per stream): ``X_i <-
AddLN(Drop(W_o^i sum_j w_ij C_ij), X_i)``; ``X_i <- AddLN(Drop(SelfAttn(X_i) [+ MPDC]), X_i)``;
``X_i <- AddLN(Drop(FFN(X_i)), X_i)``; padded / masked positions are reset to 0 after every
layer. Cross-attention projections are shared the DIPU way: each stream has one ``in_proj``
whose query part is used when it is the target and whose key / value parts when it is a
source. Head: ``MLP([mean(X_t); mean(X_a); mean(X_v)])`` over each stream's unmasked tokens.
Attention is :func:`msa_fast.ops.attention` (the six cross pairs in one call, the three
self-attentions in one call) and every residual + LayerNorm :func:`msa_fast.ops.add_layer_norm`
(one call for the three streams: the op normalises with unit weight and zero bias, and
each stream's own LayerNorm affine follows -- the same function as a per-stream
LayerNorm), so ``--backend`` changes speed, never results.

``prompts=False`` is the backbone alone ("its own backbone" of the comparison): no
prompts, no MME, no DPW (``w = 1/2``), no MPDC, no ``loss_extra``, and ``present`` is not
used -- a dropped modality is seen as the protocol leaves it (zeroed features, masks
unchanged).

``loss_extra = lambda_uni L_uni + lambda_gen L_gen + lambda_mi L_mi + lambda_orth L_orth``;
``out["aux"]`` holds the four terms (detached). Both exist in training mode only, like
FD-CMDIE's ``L_cl``: in eval mode the forward computes only what the prediction needs (the
DPW weights from the matched-pair critic scores, no ``(B, B)`` InfoNCE matrix, no
orthogonality Gram matrices, no ``L_uni`` / ``L_gen``), so the prediction is unchanged and
inference pays none of the losses. Empty key sets (in the generator, when a
sample has no other present modality) are handled by :func:`msa_fast.ops.attention`
(zero output, zero gradient), and nothing is imputed for such a sample.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from msa_fast.models import register_model
from msa_fast.models.encoders import SLSTMEncoder, build_text_encoder, encode_text, masked_mean
from msa_fast.nn.attention import AddNorm, MultiheadAttention, StackedLinear
from msa_fast.ops import _validate as V
from msa_fast.ops._common import sinusoidal_position_encoding

__all__ = ["ProMMA"]

_OP = "ProMMA"
# the six cross pairs (target, source), in the order the stacked attention call uses
_TARGETS = (0, 0, 1, 1, 2, 2)
_SOURCES = (1, 2, 0, 2, 0, 1)


def _window_mean(x: torch.Tensor, pad: torch.Tensor, stride: int):
    """Mean over non-overlapping windows of ``stride`` steps, valid steps only.

    ``x (B, L, d)``, ``pad (B, L)`` -> ``(B, ceil(L / stride), d)`` and its padding mask (a
    window is padding when it has no valid step)."""
    if stride == 1:
        return x, pad
    B, L, d = x.shape
    n = (L + stride - 1) // stride  # not -(-L // stride): ONNX exports floor division of a negative symbolic size as truncation
    keep = (~pad).to(x.dtype)
    if n * stride != L:
        x = F.pad(x, (0, 0, 0, n * stride - L))
        keep = F.pad(keep, (0, n * stride - L))
    keep = keep.view(B, n, stride)
    count = keep.sum(-1)
    out = (x.view(B, n, stride, d) * keep[..., None]).sum(2) / count.clamp(min=1.0)[..., None]
    return out, count == 0


def _stream_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``masked_mean`` over the length dim of stacked streams: ``(..., L, d) -> (..., d)``."""
    mask = mask.expand(x.shape[:-1])
    return masked_mean(x.reshape(-1, *x.shape[-2:]), mask.reshape(-1, mask.shape[-1])).view(*x.shape[:-2], -1)


class _Layer(nn.Module):
    """One backbone layer over the stacked streams ``(3, B, L, d)`` (cross -> self [+ MPDC] -> FFN)."""

    def __init__(self, d: int, heads: int, ffn_dim: int, dropout: float, dpw: bool, connect: bool,
                 backend: str | None):
        super().__init__()
        self.d, self.heads, self.backend, self.dpw, self.connect = d, heads, backend, dpw, connect
        # stream i's cross-attention: queries when it is the target, keys / values as a source
        self.cross = MultiheadAttention(d, heads, groups=3, backend=backend)
        self.self_attn = MultiheadAttention(d, heads, groups=3, backend=backend)
        self.ffn1, self.ffn2 = StackedLinear(3, d, ffn_dim), StackedLinear(3, ffn_dim, d)
        self.norm1, self.norm2, self.norm3 = (AddNorm(d, groups=3, backend=backend) for _ in range(3))
        self.dropout = nn.Dropout(dropout)
        if dpw:
            self.critic = nn.Parameter(torch.randn(3, d, d) * d ** -0.5)
            self.beta = nn.Parameter(torch.ones(3))
        if connect:
            self.conn = MultiheadAttention(d, heads, backend=backend)  # shared by the streams

    def _weights(self, x: torch.Tensor, cross: torch.Tensor, mask: torch.Tensor):
        """DPW: ``(w (3, 2, B), L_mi)`` from the InfoNCE critic of each target.

        Out of training mode only the matched-pair scores are computed (``L_mi`` is 0): the
        weights need the diagonal of the ``(B, B)`` critic matrix, its loss the rest."""
        x_bar = _stream_mean(x, mask).detach()  # (3, B, d)
        c_bar = _stream_mean(cross, mask[:, None]).detach()  # (3, 2, B, d)
        if not self.training:
            est = torch.einsum("ibd,ide,isbe->isb", x_bar, self.critic, c_bar) / math.sqrt(self.d)
            return torch.softmax(self.beta[:, None, None] * est, dim=1), x.new_zeros(())
        scores = torch.einsum("ibd,ide,isce->isbc", x_bar, self.critic, c_bar) / math.sqrt(self.d)
        B = scores.shape[-1]
        target = torch.arange(B, device=scores.device).expand(6, B).reshape(-1)
        nce = F.cross_entropy(scores.reshape(6 * B, B), target)
        est = scores.diagonal(dim1=-2, dim2=-1).detach()  # (3, 2, B)
        return torch.softmax(self.beta[:, None, None] * est, dim=1), nce

    def forward(self, x: torch.Tensor, mask: torch.Tensor, shared: torch.Tensor | None):
        _, B, L, d = x.shape
        q, k, v = self.cross.qkv(x)
        t, s = list(_TARGETS), list(_SOURCES)
        cross = self.cross.attend(q[t], k[s], v[s], mask[s]).view(3, 2, B, L, d)  # the six pairs, one launch
        nce, w = x.new_zeros(()), None
        if self.dpw:
            w, nce = self._weights(x, cross, mask)
            mixed = (w[..., None, None] * cross).sum(1)
        else:
            mixed = cross.mean(1)
        x = self.norm1(self.dropout(self.cross.out_proj(mixed)), x)
        h = self.self_attn(x, key_padding_mask=mask)  # the three self-attentions, one launch
        if self.connect:
            pk, pv = self.conn.kv(shared)
            h = h + self.conn.out_proj(self.conn.attend(self.conn.q(h), pk.repeat(3, 1, 1), pv.repeat(3, 1, 1)))
        x = self.norm2(self.dropout(h), x)
        x = self.norm3(self.dropout(self.ffn2(self.dropout(F.gelu(self.ffn1(x))))), x)
        return x.masked_fill(mask[..., None], 0.0), nce, w


class _Prompts(nn.Module):
    """Shared + missing-signal prompts and the private prompts of the three streams (MPD)."""

    def __init__(self, d: int, length: int, disentangle: bool):
        super().__init__()
        self.disentangle = disentangle
        self.shared = nn.Parameter(torch.randn(length, d) * 0.2)
        self.missing = nn.Parameter(torch.randn(3, length, d) * 0.2)
        if disentangle:
            self.private_w = nn.Parameter(torch.randn(3, d, d) * d ** -0.5)
            self.private_b = nn.Parameter(torch.zeros(3, 1, 1, d))
        else:
            self.private = nn.Parameter(torch.randn(3, 1, length, d) * 0.2)

    def forward(self, present: torch.Tensor):
        """``present (B, 3)`` -> (shared ``(B, Lp, d)``, stream prompts ``(3, B, Lp, d)``, L_orth);
        ``L_orth`` is 0 out of training mode (a loss only)."""
        signal = torch.einsum("bm,mld->bld", (~present).to(self.shared.dtype), self.missing)
        shared = self.shared + signal
        if not self.disentangle:
            return shared, self.private + signal, shared.new_zeros(())
        private = torch.einsum("bld,mde->mble", shared, self.private_w) + self.private_b
        if not self.training:
            return shared, shared + private, shared.new_zeros(())
        units = F.normalize(torch.cat([shared[None], private]), dim=-1)  # (4, B, Lp, d)
        cos2 = torch.einsum("abld,cbkd->acblk", units, units).pow(2)  # (4, 4, B, Lp, Lp)
        pairs = torch.triu(torch.ones(4, 4, dtype=torch.bool, device=shared.device), diagonal=1)
        orth = cos2[pairs].sum((-1, -2)).mean(-1).sum() / shared.shape[1] ** 2
        return shared, shared + private, orth


@register_model("promma")
class ProMMA(nn.Module):
    """ProMMA (see the module docstring). ``forward(batch) -> {"pred" (B,), "loss_extra", "aux"}``.

    Hyper-parameters (defaults sized for a CPU run of ``synthetic:mosi``): ``hidden`` d,
    ``av_hidden`` LSTM width, ``heads``, ``layers``, ``ffn_dim`` (default ``2 d``),
    ``stride`` (window of the step averaging), ``prompt_len`` Lp, ``gen_len`` Lg,
    ``dropout``; switches ``prompts`` (False = backbone only), ``impute`` (``"evaluate" |
    "always" | "never"``), ``disentangle``, ``dynamic_weighting``, ``connection`` and
    ``connect_layers`` (layer indices, default all); ``eval_threshold``; loss weights
    ``lambda_uni, lambda_gen, lambda_mi, lambda_orth``; text-encoder keys as the baselines
    (``text_model``, ``text_trust_remote_code``, ``text_finetune``); ``backend`` for the
    ops (None = the global default).
    """

    def __init__(self, dims: dict, hidden: int = 32, av_hidden: int = 32, heads: int = 2, layers: int = 2,
                 ffn_dim: int | None = None, stride: int = 4, prompt_len: int = 4, gen_len: int = 4,
                 dropout: float = 0.1, lstm_layers: int = 1, prompts: bool = True, impute: str = "evaluate",
                 disentangle: bool = True, dynamic_weighting: bool = True, connection: bool = True,
                 connect_layers: list[int] | None = None, eval_threshold: float = 1.0,
                 lambda_uni: float = 0.3, lambda_gen: float = 0.1, lambda_mi: float = 0.05,
                 lambda_orth: float = 0.01, text_model: str | None = None,
                 text_trust_remote_code: bool = False, text_finetune: bool = True,
                 backend: str | None = None, **_):
        super().__init__()
        for name, v in (("hidden", hidden), ("av_hidden", av_hidden), ("heads", heads), ("layers", layers),
                        ("stride", stride), ("prompt_len", prompt_len), ("gen_len", gen_len),
                        ("lstm_layers", lstm_layers)):
            V.positive_int(_OP, name, v)
        if hidden % heads:
            V.fail(_OP, "heads", f"a divisor of hidden = {hidden}", repr(heads))
        if ffn_dim is not None:
            V.positive_int(_OP, "ffn_dim", ffn_dim)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            V.fail(_OP, "dropout", "a float in [0, 1)", repr(dropout))
        for name, v in (("prompts", prompts), ("disentangle", disentangle),
                        ("dynamic_weighting", dynamic_weighting), ("connection", connection)):
            if not isinstance(v, bool):
                V.fail(_OP, name, "a bool", repr(v))
        V.choice(_OP, "impute", impute, ("evaluate", "always", "never"))
        V.positive_float(_OP, "eval_threshold", eval_threshold)
        for name, v in (("lambda_uni", lambda_uni), ("lambda_gen", lambda_gen), ("lambda_mi", lambda_mi),
                        ("lambda_orth", lambda_orth)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                V.fail(_OP, name, "a float >= 0", repr(v))
        if connect_layers is None:
            connect_layers = list(range(layers))
        if (not isinstance(connect_layers, (list, tuple))
                or not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < layers
                           for k in connect_layers)):
            V.fail(_OP, "connect_layers", f"a list of layer indices in [0, {layers})", repr(connect_layers))
        for key in ("audio", "vision"):
            if isinstance(dims.get(key), bool) or not isinstance(dims.get(key), int) or dims[key] < 1:
                V.fail(_OP, f"dims[{key!r}]", "a positive int feature width", repr(dims.get(key)))

        d = hidden
        self.d, self.heads, self.stride, self.backend = d, heads, stride, backend
        self.prompts, self.impute, self.eval_threshold = prompts, impute, float(eval_threshold)
        self.lambdas = (float(lambda_uni), float(lambda_gen), float(lambda_mi), float(lambda_orth))
        self.text = build_text_encoder(dims, d, 0.0, text_model, text_trust_remote_code, text_finetune)
        self.audio = SLSTMEncoder(dims["audio"], av_hidden, lstm_layers)
        self.vision = SLSTMEncoder(dims["vision"], av_hidden, lstm_layers)
        self.audio_proj, self.vision_proj = nn.Linear(av_hidden, d), nn.Linear(av_hidden, d)
        connect = set(connect_layers) if prompts and connection else set()
        self.layers = nn.ModuleList(
            _Layer(d, heads, ffn_dim or 2 * d, dropout, prompts and dynamic_weighting, k in connect, backend)
            for k in range(layers))
        if prompts:
            self.prompt = _Prompts(d, prompt_len, disentangle)
            self.uni1, self.uni2 = StackedLinear(3, d, d), StackedLinear(3, d, 1)
            self.gen_query = nn.Parameter(torch.randn(3, 1, gen_len, d) * 0.2)
            self.gen_source = nn.Parameter(torch.randn(3, 1, 1, d) * 0.2)
            self.gen_attn = MultiheadAttention(d, heads, groups=3, backend=backend)
            self.gen_norm = AddNorm(d, groups=3, backend=backend)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(nn.Linear(3 * d, d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d, 1))
        self.last_stats: dict = {}

    @staticmethod
    def upgrade_state_dict(state: dict) -> dict:
        """Checkpoints from before the shared :class:`~msa_fast.nn.attention.MultiheadAttention`
        (commit d82b6f3 and earlier; recognised by ``layers.0.cross_in.weight``): ProMMA's own
        stacked linears held ``weight (3, in, out)``, ``bias (3, 1, out)`` and its LayerNorm
        affines ``(3, 1, 1, d)``; the attention projections were separate (``cross_in`` /
        ``self_in`` = ``[q; k; v]``, ``gen_q`` + ``gen_kv``, ``conn_q`` + ``conn_kv``). Mapped
        onto ``StackedLinear`` ``(3, out, in)`` / ``(3, out)``, ``AddNorm`` ``(3, d)`` and
        ``in_proj = [W_Q; W_K; W_V]``: the same function."""
        if "layers.0.cross_in.weight" not in state:
            return state
        state = dict(state)
        out = {}

        def stacked(prefix):  # an old stacked linear -> (weight (3, out, in), bias (3, out))
            return state.pop(prefix + ".weight").transpose(1, 2), state.pop(prefix + ".bias").squeeze(1)

        def put(prefix, wb):
            out[prefix + ".weight"], out[prefix + ".bias"] = (t.contiguous() for t in wb)

        layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
        for i in layers:
            p = f"layers.{i}."
            put(p + "cross.in_proj", stacked(p + "cross_in"))
            put(p + "cross.out_proj", stacked(p + "cross_out"))
            put(p + "self_attn.in_proj", stacked(p + "self_in"))
            put(p + "self_attn.out_proj", stacked(p + "self_out"))
            put(p + "ffn1", stacked(p + "ffn1"))
            put(p + "ffn2", stacked(p + "ffn2"))
            if p + "conn_q.weight" in state:  # nn.Linear: already (out, in)
                q, kv = (state.pop(p + f"conn_{n}.weight") for n in ("q", "kv"))
                qb, kvb = (state.pop(p + f"conn_{n}.bias") for n in ("q", "kv"))
                put(p + "conn.in_proj", (torch.cat([q, kv]), torch.cat([qb, kvb])))
                put(p + "conn.out_proj", (state.pop(p + "conn_out.weight"), state.pop(p + "conn_out.bias")))
        if "gen_q.weight" in state:
            (qw, qb), (kvw, kvb) = stacked("gen_q"), stacked("gen_kv")
            put("gen_attn.in_proj", (torch.cat([qw, kvw], 1), torch.cat([qb, kvb], 1)))
            put("gen_attn.out_proj", stacked("gen_out"))
            put("uni1", stacked("uni1"))
            put("uni2", stacked("uni2"))
        for key in [k for k in state if "." in k and k.split(".")[-2].startswith(("norm", "gen_norm"))]:
            value = state.pop(key)  # layers.<i>.norm<j>.*, gen_norm.*: (3, 1, 1, d) -> (3, d)
            out[key] = value.reshape(value.shape[0], value.shape[-1])
        return {**state, **out}

    def _encode(self, batch: dict):
        """Stacked streams ``(3, B, L, d)`` and their padding masks ``(3, B, L)``."""
        t, _ = encode_text(self.text, batch)
        a = self.audio_proj(self.audio(batch["audio"], batch["audio_mask"])[0])
        v = self.vision_proj(self.vision(batch["vision"], batch["vision_mask"])[0])
        seqs, pads = [], []
        for x, pad in zip((t, a, v), (batch["text_mask"], batch["audio_mask"], batch["vision_mask"])):
            x, pad = _window_mean(x, pad, self.stride)
            seqs.append(x + sinusoidal_position_encoding(x.shape[1], self.d, device=x.device, dtype=x.dtype))
            pads.append(pad)
        L = max(x.shape[1] for x in seqs)
        x = torch.stack([F.pad(x, (0, 0, 0, L - x.shape[1])) for x in seqs])
        pad = torch.stack([F.pad(p, (0, L - p.shape[1]), value=True) for p in pads])
        return x, pad

    def _unimodal(self, pooled: torch.Tensor) -> torch.Tensor:
        """Unimodal predictors ``f_m``: ``(3, B, d) -> (3, B)``."""
        return self.uni2(self.dropout(F.relu(self.uni1(pooled)))).squeeze(-1)

    def _generate(self, x: torch.Tensor, absent: torch.Tensor) -> torch.Tensor:
        """Every modality generated from the present others -> ``(3, B, Lg, d)``."""
        _, B, L, d = x.shape
        s = list(_SOURCES)
        keys = (x + self.gen_source)[s].view(3, 2, B, L, d).transpose(1, 2).reshape(3, B, 2 * L, d)
        key_mask = absent[s].view(3, 2, B, L).transpose(1, 2).reshape(3 * B, 2 * L)
        query = self.gen_query.expand(3, B, -1, -1)
        att = self.gen_attn(query, keys, key_mask.view(3, B, 2 * L))
        return self.gen_norm(att, query)

    def _evaluate(self, x, absent, present, labels):
        """MME: pseudo-labels, generation, the impute decision ``(3, B)`` and ``L_uni, L_gen``."""
        pooled = _stream_mean(x, absent)
        uni = self._unimodal(pooled)
        gen = self._generate(x, absent)
        gen_pooled = gen.mean(2)
        pres = present.t().to(x.dtype)  # (3, B)
        n_present = pres.sum(0, keepdim=True)
        others = (n_present - pres) > 0
        loss_uni = loss_gen = x.new_zeros(())
        if self.training:  # the two losses; eval mode needs only the impute decision
            if labels is not None:
                loss_uni = ((uni - labels).abs() * pres).sum() / pres.sum().clamp(min=1.0)
            target = (pres > 0) & others
            err = (gen_pooled - pooled.detach()).pow(2).mean(-1)
            loss_gen = (err * target.to(err.dtype)).sum() / target.sum().clamp(min=1)
        missing = (pres == 0) & others
        if self.impute == "never":
            imputed = torch.zeros_like(missing)
        elif self.impute == "always":
            imputed = missing
        else:
            with torch.no_grad():
                pseudo = (uni * pres).sum(0, keepdim=True) / n_present.clamp(min=1.0)
                imputed = missing & ((self._unimodal(gen_pooled) - pseudo).abs() <= self.eval_threshold)
        # a 0-dim tensor, not a float: reading it here would be a host sync (a graph break under
        # torch.compile, a failed CUDA graph capture); 0 / 0 = NaN when nothing is missing
        self.last_stats["imputed"] = (imputed.sum() / (pres == 0).sum()).detach()
        return gen, imputed, loss_uni, loss_gen

    def forward(self, batch: dict) -> dict:
        x, mask = self._encode(batch)
        B = x.shape[1]
        shared, extra = None, None
        if self.prompts:
            present = batch.get("present")
            if present is None:
                present = torch.ones(B, 3, dtype=torch.bool, device=x.device)
            present = present.to(x.device).bool()
            absent = mask | ~present.t()[..., None]
            gen, imputed, loss_uni, loss_gen = self._evaluate(x, absent, present, batch.get("labels"))
            shared, private, loss_orth = self.prompt(present)
            Lp, Lg = private.shape[2], gen.shape[2]
            x = torch.cat([private, x.masked_fill(absent[..., None], 0.0),
                           gen.masked_fill(~imputed[..., None, None], 0.0)], dim=2)
            mask = torch.cat([absent.new_zeros(3, B, Lp), absent, (~imputed)[..., None].expand(3, B, Lg)], dim=2)
            extra = [loss_uni, loss_gen, None, loss_orth]
        else:
            x = x.masked_fill(mask[..., None], 0.0)
        nce, weights = x.new_zeros(()), []
        for layer in self.layers:
            x, layer_nce, w = layer(x, mask, shared)
            nce = nce + layer_nce / len(self.layers)
            weights.append(w)
        pooled = _stream_mean(x, mask)  # (3, B, d)
        out = {"pred": self.head(pooled.transpose(0, 1).reshape(B, -1)).squeeze(-1)}
        if extra is not None:
            if self.training:
                extra[2] = nce
                out["loss_extra"] = sum(lam * term for lam, term in zip(self.lambdas, extra))
                out["aux"] = {name: term.detach() for name, term in zip(("uni", "gen", "mi", "orth"), extra)}
            if weights[0] is not None:
                # (layers, 3): per layer, the mean DPW weight of each target's first source
                # (t<-a, a<-t, v<-t); a tensor, for the reason of last_stats["imputed"]
                self.last_stats["dpw"] = torch.stack([w[:, 0].detach().mean(-1) for w in weights])
        return out

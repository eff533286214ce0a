"""FD-CMDIE: feature decoupling + cross-modal deep interaction enhancement (paper 001, eq. 1-32).

Pipeline, per batch (``B`` samples, modality order t, a, v everywhere in code; the paper
writes t, v, a):

1. **Encoders** (eq. 1-3, :mod:`msa_fast.models.encoders`): text from 768-d features
   (``GELU(W x)`` per token) or a local Hugging Face model fine-tuned on ``text_bert``
   ids (``text_model``, e.g. NeoBERT with ``text_trust_remote_code=True``); audio and
   vision through stacked LSTMs (sLSTM, ``lstm_layers``) over packed lengths. Every
   encoder outputs width ``d``: ``F_m (B, L_m, d)``, padded positions 0.
2. **Decoupling** (eq. 4-6): one shared similarity encoder and three dissimilarity
   encoders, each ``Dropout(Tanh(Linear(LayerNorm(x))))`` applied per token:
   ``X_s = Enc_s(F_x)``, ``X_d = Enc_d^x(F_x)`` -> ``T_s, A_s, V_s, T_d, A_d, V_d
   (B, L_m, d)``.
3. **Contrastive loss** (eq. 7-12, training mode only): the sample vectors
   ``x_s = masked_mean_L(X_s)``, ``x_d = masked_mean_L(X_d)`` of the batch and of its
   mined partners go to :class:`msa_fast.nn.FDCMDIEContrastiveLoss` (pair sets P^i / N^i,
   NT-Xent + ``lambda_tri`` triplet, see :func:`msa_fast.ops.reference.fd_cmdie_contrastive_loss`).
4. **CMDIE** (eq. 13-29, :class:`msa_fast.nn.CMDIE`): the global similarity feature
   ``G_s`` built from ``T_s, A_s, V_s`` (``global_feature``, below) interacts with
   ``T_d, A_d, V_d`` through ``layers`` layers of three DIPUs, pooled by GAP after each layer.
5. **Head** (eq. 30): ``MLP(concat(mean(G), mean(T_d), mean(A_d), mean(V_d)))`` with
   masked means over time, ``MLP = Linear(4d, hidden) - ReLU - Dropout - Linear(hidden, 1)``.
6. **Loss** (eq. 31-32): the trainer adds ``L1(pred, y)``; the model returns
   ``loss_extra = lambda_cl * L_cl`` in training mode once pairs are mined, nothing otherwise
   (eval mode has no partners; a model used before :meth:`FDCMDIE.on_epoch_start` skips the
   term instead of failing).

**Pair mining** (eq. 7-8) is dataset-level and runs in :meth:`FDCMDIE.on_epoch_start`
(the trainer calls it before every training epoch): the encoders, in eval mode without
gradients, encode the whole train split in order (batches of ``mine_batch_size``); each
sample's vector is ``[mean_L F_t; mean_L F_a; mean_L F_v]`` (eq. 8's concatenation, pooled
over time, 3d wide); :func:`msa_fast.ops.mine_pairs` with ``k = k_cl`` and the labels
``sentiment_classes(y, label_scheme)`` returns ``similar^i`` (the k most similar
same-label samples) and ``different^i`` (the k least similar other-label samples).

**Partners** of the contrastive loss (``partner_source``):

* ``"forward"`` (faithful): the partners' raw inputs are gathered from the train split kept
  by the hook (:func:`msa_fast.data.loader.gather_batch`, each unique row once) and run
  through the encoders and decouplers in the same mode as the batch, with gradients.
  ``partners_per_sample`` (None = all ``k_cl``) draws that many of each sample's
  ``similar^i`` and of its ``different^i`` at random every step (global torch RNG) so a
  CPU run stays affordable; missing partners (``-1``, class too small) are masked out.
* ``"bank"`` (fast): a detached memory bank of every train sample's ``x_s, x_d``
  refreshed as batches pass (the batch's rows are written before its partners are read;
  a partner not seen yet is masked out). The bank is not saved in checkpoints
  (non-persistent buffers): it refills within an epoch after a resume.

Formulation choices where the paper is vague:

- Encoders output the common width ``d`` (the shared similarity encoder needs one input
  width); the text encoder is a projection of BERT features unless ``text_model`` is set.
- Eq. 4-6 act per token on the sequences; the contrastive loss and mining need one vector
  per sample and modality, taken as the masked mean over time (sequences for CMDIE stay
  unpooled).
- "Same multimodal sentiment label" for mining = the 7-class label
  ``round(clip(y, -3, 3))`` (``label_scheme="7"``; section 3.1 describes the labels as the
  7 classes strong negative .. strong positive; ``"3"`` and ``"2"`` are available).
  Mining features are recomputed with the current encoders at every epoch (the first
  epoch mines with the initial weights).
- The paper does not say how ``G_s`` is built from ``T_s, A_s, V_s``. ``global_feature=
  "concat"``: concatenation in time (:meth:`msa_fast.nn.CMDIE.global_feature`; keeps every
  token, works unaligned; the presets use it); ``"mean"``: the per-position mean over the
  modalities present (aligned data only: equal lengths); ``"auto"`` (default): ``"mean"``
  when the three sequences have equal length, else ``"concat"``. ``"mean"`` keeps ``G`` as
  long as one modality, which makes the attentions on ``G`` about 3x (cross) and 9x (self)
  cheaper -- what makes the default affordable on one CPU thread.
  The head pools each CMDIE output by its masked mean.
- Missing modalities (``batch["present"]`` False): that modality's positions are masked
  everywhere (encoder inputs zeroed, keys masked, pooled vector 0). Partners use their
  clean inputs (the missing-modality protocol is not applied to them).

Ablations (Table 7): ``no_cl`` (no mining, no contrastive term), ``no_cmdie`` (no CMDIE:
the head reads ``concat`` of the six pooled decoupled features, 6d wide), ``no_gap``
(CMDIE pools the three enhanced G's by their mean, ``pool="mean"``), ``no_crossatt2``
(every DIPU without eq. 21-22). "w/o NeoBERT" is a choice of ``text_model``.

Hyper-parameters (``cfg``; unknown keys ignored): ``d`` 32, ``heads`` 2, ``layers`` 1
(Table 2: 3; see ``presets``), ``ffn_dim`` (default ``2 d``), ``hidden`` 64 (head width),
``lstm_layers`` 1, ``dropout`` 0.1, ``k_cl`` 10, ``tau`` 0.5, ``margin`` 0.5, ``lambda_tri``
0.1, ``lambda_cl`` 0.1, ``partner_source`` ``"forward"``, ``partners_per_sample`` 2,
``label_scheme`` ``"7"``, ``mine_batch_size`` 256, ``global_feature`` ``"auto"``, the four ablation switches, ``backend``
(None: the global default) and the text-encoder options of the baselines (``text_model``,
``text_trust_remote_code``, ``text_finetune``). The defaults are sized for a 1-thread CPU
run on ``synthetic:mosi``; ``presets["mosi" | "mosei"]`` hold Table 2 (batch size, lr,
epochs, ``k_cl``, ``tau``, margin, ``layers``, ``lambda_tri``, ``lambda_cl``; AdamW is the
trainer's optimizer) with all ``k_cl`` partners per step (MOSI, forward) or the memory bank
(MOSEI, as contract §3.4).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from msa_fast import ops
from msa_fast.data.loader import gather_batch
from msa_fast.models import register_model
from msa_fast.models.encoders import SLSTMEncoder, build_text_encoder, encode_text, masked_mean
from msa_fast.nn.contrastive import FDCMDIEContrastiveLoss
from msa_fast.nn.dipu import CMDIE
from msa_fast.ops import _validate as V

__all__ = ["FDCMDIE", "Decoupler"]

MODALITIES = ("text", "audio", "vision")
_OP = "FDCMDIE"
_SOURCES = ("forward", "bank")
_SCHEMES = ("7", "3", "2")
_GLOBAL = ("auto", "concat", "mean")


def _fail(name: str, expected: str, got: object) -> None:
    V.fail(_OP, name, expected, repr(got))


_int = functools.partial(V.config_int, _OP)
_float = functools.partial(V.config_float, _OP)


def _bool(name: str, v: object) -> bool:
    if not isinstance(v, bool):
        _fail(name, "a bool", v)
    return v


class Decoupler(nn.Sequential):
    """Eq. 4-6: ``Dropout(Tanh(Linear(LayerNorm(x))))``, per token, ``(..., d) -> (..., d)``."""

    def __init__(self, d: int, dropout: float) -> None:
        super().__init__(nn.LayerNorm(d), nn.Linear(d, d), nn.Tanh(), nn.Dropout(dropout))


@register_model("fd_cmdie")
class FDCMDIE(nn.Module):
    """FD-CMDIE for regression; the module docstring lists the architecture and every choice."""

    presets = {
        "mosi": {"train": {"batch_size": 32, "lr": 1e-4, "epochs": 50},
                 "model": {"k_cl": 10, "tau": 0.5, "margin": 0.5, "layers": 3, "lambda_tri": 0.1,
                           "lambda_cl": 0.1, "partner_source": "forward", "partners_per_sample": None,
                           "global_feature": "concat"}},
        "mosei": {"train": {"batch_size": 16, "lr": 1e-4, "epochs": 12},
                  "model": {"k_cl": 50, "tau": 0.5, "margin": 0.5, "layers": 3, "lambda_tri": 0.1,
                            "lambda_cl": 0.1, "partner_source": "bank", "partners_per_sample": None,
                            "global_feature": "concat"}},
    }

    def __init__(self, dims: dict, d: int = 32, heads: int = 2, layers: int = 1, ffn_dim: int | None = None,
                 hidden: int = 64, lstm_layers: int = 1, dropout: float = 0.1, k_cl: int = 10,
                 tau: float = 0.5, margin: float = 0.5, lambda_tri: float = 0.1, lambda_cl: float = 0.1,
                 partner_source: str = "forward", partners_per_sample: int | None = 2,
                 label_scheme: str = "7", mine_batch_size: int = 256, global_feature: str = "auto", no_cl: bool = False,
                 no_cmdie: bool = False, no_gap: bool = False, no_crossatt2: bool = False,
                 backend: str | None = None, text_model: str | None = None,
                 text_trust_remote_code: bool = False, text_finetune: bool = True, **_):
        super().__init__()
        d, heads = _int("d", d, 1), _int("heads", heads, 1)
        if d % heads:
            _fail("heads", f"a divisor of d = {d}", heads)
        layers = _int("layers", layers, 1)
        ffn_dim = 2 * d if ffn_dim is None else _int("ffn_dim", ffn_dim, 1)
        _int("hidden", hidden, 1)
        _int("lstm_layers", lstm_layers, 1)
        dropout = _float("dropout", dropout, 0.0, 1.0)
        self.k_cl = _int("k_cl", k_cl, 1)
        tau = _float("tau", tau, 0.0, low_open=True)
        margin = _float("margin", margin, 0.0)
        lambda_tri = _float("lambda_tri", lambda_tri, 0.0)
        self.lambda_cl = _float("lambda_cl", lambda_cl, 0.0)
        if partner_source not in _SOURCES:
            _fail("partner_source", f"one of {_SOURCES}", partner_source)
        if partners_per_sample is not None:
            _int("partners_per_sample", partners_per_sample, 1)
        if label_scheme not in _SCHEMES:
            _fail("label_scheme", f"one of {_SCHEMES}", label_scheme)
        if global_feature not in _GLOBAL:
            _fail("global_feature", f"one of {_GLOBAL}", global_feature)
        self.global_mode = global_feature
        self.mine_batch_size = _int("mine_batch_size", mine_batch_size, 1)
        self.no_cl, self.no_cmdie = _bool("no_cl", no_cl), _bool("no_cmdie", no_cmdie)
        self.no_gap, self.no_crossatt2 = _bool("no_gap", no_gap), _bool("no_crossatt2", no_crossatt2)
        self.d, self.partner_source, self.partners_per_sample = d, partner_source, partners_per_sample
        self.label_scheme, self.backend = label_scheme, backend
        self._loss_args = dict(tau=tau, margin=margin, lambda_tri=lambda_tri, backend=backend)

        self.text = build_text_encoder(dims, d, dropout, text_model, text_trust_remote_code, text_finetune)
        self.audio = SLSTMEncoder(dims["audio"], d, lstm_layers, dropout)
        self.vision = SLSTMEncoder(dims["vision"], d, lstm_layers, dropout)
        self.sim_enc = Decoupler(d, dropout)  # shared by the three modalities
        self.diff_enc = nn.ModuleList(Decoupler(d, dropout) for _ in MODALITIES)
        self.cmdie = None if no_cmdie else CMDIE(
            d, heads, layers, ffn_dim, dropout, pool="mean" if no_gap else "gap", cross2=not no_crossatt2,
            backend=backend)
        self.head = nn.Sequential(nn.Linear((6 if no_cmdie else 4) * d, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, 1))
        # "forward" needs no state; "bank" is built by on_epoch_start once N is known.
        self.cl_loss = None if no_cl or partner_source == "bank" else FDCMDIEContrastiveLoss(
            partner_source="forward", **self._loss_args)
        self._train_split = None  # kept by on_epoch_start for the forward partners
        self.mined: ops.MinedPairs | None = None  # (N, k_cl) similar / different indices

    # -- pieces -------------------------------------------------------------------------

    def _masks(self, batch: dict) -> list[torch.Tensor]:
        masks = [batch[f"{m}_mask"] for m in MODALITIES]
        present = batch.get("present")
        if present is not None:  # no `if present.all()` shortcut: a host sync and a graph break
            masks = [mk | ~present[:, i, None] for i, mk in enumerate(masks)]
        return masks

    def encode(self, batch: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Eq. 1-3: ``[F_t, F_a, F_v]`` (B, L_m, d), padded / dropped positions 0, and their masks."""
        masks = self._masks(batch)
        inputs = dict(batch)
        # The text features are not masked on the way in: the feature encoder is per token and
        # its outputs at masked positions are zeroed below, so that would only copy the
        # (B, L, 768) input (the largest tensor of a batch); BERT ids carry their own mask.
        for i, m in ((1, "audio"), (2, "vision")):
            inputs[m] = batch[m].masked_fill(masks[i][..., None], 0.0)
        t, _ = encode_text(self.text, inputs)
        a, _ = self.audio(inputs["audio"], masks[1])
        v, _ = self.vision(inputs["vision"], masks[2])
        return [x.masked_fill(mk[..., None], 0.0) for x, mk in zip((t, a, v), masks)], masks

    def decouple(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Eq. 4-6: ``([T_s, A_s, V_s], [T_d, A_d, V_d])``, each ``(B, L_m, d)``."""
        return [self.sim_enc(f) for f in feats], [enc(f) for enc, f in zip(self.diff_enc, feats)]

    @staticmethod
    def _pool(seqs: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([masked_mean(s, m) for s, m in zip(seqs, masks)], dim=1)  # (B, 3, d)

    def _vectors(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled ``(sim (B, 3, d), diff (B, 3, d))`` of a batch: what the contrastive loss sees."""
        feats, masks = self.encode(batch)
        sims, diffs = self.decouple(feats)
        return self._pool(sims, masks), self._pool(diffs, masks)

    @torch.no_grad()
    def mining_features(self, ctx, batch_size: int | None = None) -> torch.Tensor:
        """Eq. 8's ``[F_t; F_a; F_v]`` of every row of ``ctx.train`` (an
        :class:`~msa_fast.train.trainer.EpochContext`) in order, pooled over time: ``(N, 3d)``
        float32, in the run's autocast. Runs in the module's current mode (``on_epoch_start``
        sets eval). Under data parallelism (``ctx.dist``) block ``j`` runs on rank
        ``j % world`` and the blocks are all-gathered: the same blocks as one process."""
        bs = batch_size or self.mine_batch_size
        n = len(ctx.train)

        def run(rows):
            with ctx.autocast():
                feats, masks = self.encode(ctx.batch(rows))
            return self._pool(feats, masks).flatten(1).float()

        blocks = [torch.arange(s, min(s + bs, n)) for s in range(0, n, bs)]
        return torch.cat(ctx.dist.gather_batches(blocks, run)).to(ctx.device)

    def on_epoch_start(self, ctx) -> None:
        """Dataset-level pair mining (eq. 7-8) over ``ctx.train``; see the module docstring."""
        if self.no_cl:
            return
        was_training = self.training
        self.eval()
        try:
            feats = self.mining_features(ctx, max(ctx.batch_size, self.mine_batch_size))
        finally:
            self.train(was_training)
        labels = ops.sentiment_classes(ctx.train.labels.to(feats.device), self.label_scheme)
        if ctx.dist.active:  # each rank mines its queries against every key; lists all-gathered
            q = ctx.dist.shard(len(feats)).to(feats.device)
            part = ops.mine_pairs(feats, labels, self.k_cl, feats[q], labels[q], q)
            parts = ctx.dist.all_gather_object(tuple(t.cpu() for t in part))
            self.mined = type(part)(*(torch.cat(ts).to(feats.device) for ts in zip(*parts)))
        else:
            self.mined = ops.mine_pairs(feats, labels, self.k_cl)
        self._train_split = ctx.train
        n = len(ctx.train)
        if self.partner_source == "bank" and (self.cl_loss is None or self.cl_loss.num_samples != n):
            self.cl_loss = FDCMDIEContrastiveLoss(n, self.d, partner_source="bank", persistent=False,
                                                  **self._loss_args).to(ctx.device)

    def _sample_partners(self, idx: torch.Tensor, batch: dict) -> torch.Tensor:
        """``partners_per_sample`` random columns of ``idx (B, k)``, valid (``>= 0``) entries first.
        A data-parallel shard (``global_rows`` / ``global_size`` in ``batch``) draws the scores of
        the whole global batch and keeps its rows, so N ranks pick what one process picks."""
        p = self.partners_per_sample
        if p is None or p >= idx.shape[1]:
            return idx
        if "global_size" in batch:
            score = torch.rand((batch["global_size"], idx.shape[1]), device=idx.device)
            score = score[batch["global_rows"].to(idx.device)]
        else:
            score = torch.rand(idx.shape, device=idx.device)
        score = score.masked_fill(idx < 0, -1.0)
        return idx.gather(1, score.topk(p, dim=1).indices)

    def _contrastive(self, batch: dict, sim: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
        rows = batch["index"].to(self.mined.pos_idx.device)
        pos_idx = self._sample_partners(self.mined.pos_idx[rows], batch).to(sim.device)
        neg_idx = self._sample_partners(self.mined.neg_idx[rows], batch).to(sim.device)
        if self.partner_source == "bank":
            return self.cl_loss(sim, diff, pos_idx=pos_idx, neg_idx=neg_idx, indices=batch["index"].to(sim.device))
        pos_mask, neg_mask = pos_idx >= 0, neg_idx >= 0
        both = torch.cat([pos_idx[pos_mask], neg_idx[neg_mask]])
        uniq, inverse = torch.unique(both, return_inverse=True)
        B, kp, kn = sim.shape[0], pos_idx.shape[1], neg_idx.shape[1]
        pos_feats = sim.new_zeros(B, kp, 2, 3, self.d)
        neg_feats = sim.new_zeros(B, kn, 3, self.d)
        if uniq.numel():
            pb = gather_batch(self._train_split, uniq.cpu())
            pb = {k: v.to(sim.device) if torch.is_tensor(v) else v for k, v in pb.items()}
            p_sim, p_diff = self._vectors(pb)  # (U, 3, d) each, with gradients
            n_pos = int(pos_mask.sum())
            p_both = torch.stack([p_sim, p_diff], 1).to(sim.dtype)
            pos_feats = pos_feats.index_put((pos_mask,), p_both[inverse[:n_pos]])
            neg_feats = neg_feats.index_put((neg_mask,), p_both[inverse[n_pos:], 0])
        return self.cl_loss(sim, diff, pos_feats, neg_feats, pos_mask, neg_mask)

    def _global_feature(self, sims: list[torch.Tensor], masks: list[torch.Tensor], aligned: bool | None = None):
        """``G_s`` and its mask from ``T_s, A_s, V_s`` (``global_feature``, module docstring).
        ``aligned``: the batch's layout where its producer knows it (``batch["aligned"]``, set
        by the Predictor, whose length buckets can give unaligned data three equal lengths);
        None: equal lengths mean aligned."""
        same = sims[0].shape[1] == sims[1].shape[1] == sims[2].shape[1]
        mode = self.global_mode
        if mode == "auto":
            mode = "mean" if (same if aligned is None else aligned and same) else "concat"
        if mode == "concat":
            return CMDIE.global_feature(*sims, *masks)
        if not same:
            _fail("global_feature", "'concat' or 'auto' for sequences of different lengths (unaligned data)",
                  "mean")
        keep = torch.stack([~m for m in masks]).unsqueeze(-1).to(sims[0].dtype)  # (3, B, L, 1)
        G = (torch.stack(sims) * keep).sum(0) / keep.sum(0).clamp(min=1.0)
        return G, keep.sum(0).squeeze(-1) == 0

    # -- forward ------------------------------------------------------------------------

    @staticmethod
    def upgrade_state_dict(state: dict) -> dict:
        """Checkpoints from before the batched CMDIE (commit d82b6f3 and earlier) held one DIPU
        per modality pair, ``cmdie.units.<layer>.<pair>.<param>``; the batched CMDIE stacks the
        three along a leading dim, ``cmdie.units.<layer>.<param>`` ``(3, ...)`` (same
        orientation, the same pair order): the same function."""
        out, pairs = {}, {}
        for key, value in state.items():
            parts = key.split(".")
            if key.startswith("cmdie.units.") and len(parts) > 4 and parts[3].isdigit():
                pairs.setdefault(".".join(parts[:3] + parts[4:]), {})[int(parts[3])] = value
            else:
                out[key] = value
        for key, per_pair in pairs.items():
            if sorted(per_pair) != [0, 1, 2]:
                raise ValueError(f"old per-DIPU CMDIE weights {key}: expected the pairs 0, 1, 2, "
                                 f"got {sorted(per_pair)}")
            out[key] = torch.stack([per_pair[i] for i in range(3)])
        return out

    def forward(self, batch: dict) -> dict:
        feats, masks = self.encode(batch)
        sims, diffs = self.decouple(feats)
        if self.cmdie is None:
            fused = torch.cat([masked_mean(s, m) for s, m in zip(sims + diffs, masks + masks)], dim=-1)
        else:
            G, g_mask = self._global_feature(sims, masks, batch.get("aligned"))
            G, T_d, A_d, V_d = self.cmdie(G, *diffs, g_mask, *masks)
            fused = torch.cat([masked_mean(x, m) for x, m in zip((G, T_d, A_d, V_d), (g_mask, *masks))], dim=-1)
        out = {"pred": self.head(fused).squeeze(-1)}
        if (self.training and not self.no_cl and self.mined is not None and "index" in batch
                and self.cl_loss is not None):
            l_cl = self._contrastive(batch, self._pool(sims, masks), self._pool(diffs, masks))
            out["loss_cl"] = l_cl.detach()
            out["loss_extra"] = self.lambda_cl * l_cl
        return out

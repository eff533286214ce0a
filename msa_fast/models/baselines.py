"""Baselines: ``text_only`` and ``lf_dnn`` (late fusion).

- ``text_only``: text encoder -> pooled ``t`` -> ``MLP(t)``.
- ``lf_dnn``: per-modality encoders (text features / HF, audio and vision sLSTMs) ->
  pooled ``t, a, v`` -> ``MLP([t; a; v])``, as MMSA's LF_DNN late fusion but with sequence
  encoders instead of time-averaged inputs.

``text_model`` (a local Hugging Face directory), ``text_trust_remote_code`` and
``text_finetune`` select and configure a HF text encoder on ``text_bert`` ids.

``MLP(x) = W2 Dropout(ReLU(W1 x))``, output squeezed to ``(B,)``. Plain ``torch.nn`` only.
"""

from __future__ import annotations

import torch
from torch import nn

from msa_fast.models.encoders import SLSTMEncoder, build_text_encoder, encode_text


def _head(in_dim: int, hidden: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, 1))


class TextOnly(nn.Module):
    def __init__(self, dims: dict, hidden: int = 64, dropout: float = 0.1,
                 text_model: str | None = None, text_trust_remote_code: bool = False,
                 text_finetune: bool = True, **_):
        super().__init__()
        self.text = build_text_encoder(dims, hidden, dropout, text_model, text_trust_remote_code,
                                       text_finetune)
        self.head = _head(self.text.out_dim, hidden, dropout)

    def forward(self, batch: dict) -> dict:
        _, t = encode_text(self.text, batch)
        return {"pred": self.head(t).squeeze(-1)}


class LFDNN(nn.Module):
    def __init__(self, dims: dict, hidden: int = 64, av_hidden: int = 32, lstm_layers: int = 1,
                 dropout: float = 0.1, text_model: str | None = None,
                 text_trust_remote_code: bool = False, text_finetune: bool = True, **_):
        super().__init__()
        self.text = build_text_encoder(dims, hidden, dropout, text_model, text_trust_remote_code,
                                       text_finetune)
        self.audio = SLSTMEncoder(dims["audio"], av_hidden, lstm_layers, dropout)
        self.vision = SLSTMEncoder(dims["vision"], av_hidden, lstm_layers, dropout)
        fused = self.text.out_dim + self.audio.out_dim + self.vision.out_dim
        self.head = _head(fused, hidden, dropout)

    def forward(self, batch: dict) -> dict:
        _, t = encode_text(self.text, batch)
        _, a = self.audio(batch["audio"], batch["audio_mask"])
        _, v = self.vision(batch["vision"], batch["vision_mask"])
        return {"pred": self.head(torch.cat([t, a, v], dim=-1)).squeeze(-1)}

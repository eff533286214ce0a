"""Reusable unimodal encoders. Every encoder maps ``(x, mask)`` (mask True = padding) to
``(seq (B, L, H), pooled (B, H))``; padded positions of ``seq`` are 0.

- :class:`SLSTMEncoder` (audio / vision): stacked LSTM over the valid frames of each
  sequence (lengths from the mask, at least 1), as over packed sequences; ``pooled`` = the
  last layer's final hidden state (both directions concatenated when bidirectional).
- :class:`FeatureTextEncoder`: 768-d pre-extracted BERT features -> ``GELU(W x)`` per token,
  masked mean over valid tokens for ``pooled``. (Cheap on a CPU; the heavy lifting was done
  by the BERT that extracted the features.)
- :class:`HFTextEncoder`: any Hugging Face encoder from a local directory
  (``transformers.AutoModel``, ``local_files_only=True``, never downloads) fine-tuned on
  ``text_bert`` ids; ``seq`` is a projection of the last hidden state, ``pooled`` its CLS row.
- :func:`masked_mean`, and :func:`lstm_lengths` / :func:`valid_outputs`, the padded LSTM run
  that the Predictor's traceable copy shares.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from msa_fast.ops.lstm import lstm as lstm_op
from msa_fast.ops.lstm import lstm_weights


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of ``x (B, L, H)`` ignoring ``mask`` True positions; all-padding -> 0."""
    if mask is None:
        return x.mean(1)
    keep = (~mask).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)


def lstm_lengths(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Valid frames per sequence of ``x (B, L, d)``, at least 1 (an empty one reads frame 0)."""
    B, L, _ = x.shape
    lengths = (L - mask.sum(1)) if mask is not None else torch.full((B,), L, device=x.device)
    return lengths.clamp(min=1)


def valid_outputs(out: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A unidirectional LSTM's padded-batch output ``(B, L, H)`` as the packed run gives it:
    steps past each length zeroed (``pad_packed_sequence``), and the last valid step, which
    is the final hidden state of the last layer -> ``(seq, pooled)``."""
    B, L, _ = out.shape
    keep = torch.arange(L, device=out.device)[None, :] < lengths[:, None]
    return out * keep[..., None].to(out.dtype), out[torch.arange(B, device=out.device), lengths - 1]


class SLSTMEncoder(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 32, layers: int = 1, dropout: float = 0.0,
                 bidirectional: bool = False):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, num_layers=layers, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0, bidirectional=bidirectional)
        self.out_dim = hidden * (2 if bidirectional else 1)
        self.inference_op = False
        self._op_args: tuple | None = None

    def use_inference_op(self, on: bool = True) -> bool:
        """Inference only (no autograd): run the padded LSTM as the registered op
        ``msa_fast::lstm`` (:mod:`msa_fast.ops.lstm`), one node that torch.compile,
        torch.export and ONNX see whole, where Dynamo refuses to touch an ``nn.LSTM`` module at
        all. The weights are kept aside here (the same parameters), since the forward must not
        reach ``self.lstm``. Unidirectional LSTMs with biases only; returns whether it is on.
        The Predictor sets it on its copy of the model."""
        lstm = self.lstm
        ok = on and not lstm.bidirectional and lstm.bias and not lstm.proj_size
        self.inference_op = bool(ok)
        self._op_args = (lstm_weights(lstm), lstm.hidden_size) if ok else None
        return self.inference_op

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """Unidirectional: the LSTM runs over the padded batch and the outputs past each
        length are zeroed, ``pooled`` gathered at the last valid frame -- the packed run's
        values (the padding comes after the valid frames, so it never reaches them; equal
        within 2e-7), 20x faster to train on the CPU: PyTorch's packed LSTM backward
        allocates and zero-fills the whole packed buffer once per time step (O(L^2): 80 %
        of an FD-CMDIE step at MOSI unaligned), while the padded one is one fused kernel.
        Bidirectional: packed (the reverse direction must start at each sequence's end)."""
        lengths = lstm_lengths(x, mask)
        if self.inference_op:
            return valid_outputs(lstm_op(x, *self._op_args), lengths)
        if not self.lstm.bidirectional:
            return valid_outputs(self.lstm(x)[0], lengths)
        L = x.shape[1]
        lengths = lengths.cpu()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, (h, _) = self.lstm(packed)
        seq, _ = pad_packed_sequence(out, batch_first=True, total_length=L)
        return seq, torch.cat([h[-2], h[-1]], dim=-1)


class FeatureTextEncoder(nn.Module):
    def __init__(self, in_dim: int = 768, hidden: int = 64, dropout: float = 0.0):
        super().__init__()
        self.proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.GELU())
        self.out_dim = hidden

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        seq = self.proj(x)
        if mask is not None:
            seq = seq * (~mask).unsqueeze(-1).to(seq.dtype)
        return seq, masked_mean(seq, mask)


class HFTextEncoder(nn.Module):
    """``path``: a local directory with ``config.json`` and weights (no network access)."""

    def __init__(self, path: str, hidden: int = 64, finetune: bool = True,
                 trust_remote_code: bool = False):
        super().__init__()
        from transformers import AutoModel  # heavy import, only when used

        self.model = AutoModel.from_pretrained(path, local_files_only=True,
                                               trust_remote_code=trust_remote_code)
        if not finetune:
            self.model.requires_grad_(False)
        self.proj = nn.Linear(self.model.config.hidden_size, hidden)
        self.out_dim = hidden

    def forward(self, text_bert: torch.Tensor, mask: torch.Tensor | None = None):
        ids, attn, seg = text_bert[:, 0].long(), text_bert[:, 1].long(), text_bert[:, 2].long()
        out = self.model(input_ids=ids, attention_mask=attn, token_type_ids=seg)
        seq = self.proj(out.last_hidden_state)
        return seq, seq[:, 0]


def build_text_encoder(dims: dict, hidden: int, dropout: float = 0.0,
                       text_model: str | None = None, trust_remote_code: bool = False,
                       finetune: bool = True) -> nn.Module:
    """Features encoder for ``text`` input, HF encoder when ``text_model`` (a local path) is set.

    ``trust_remote_code`` lets ``AutoModel`` run the model's own code (NeoBERT needs it);
    ``finetune=False`` freezes the HF weights (only the projection trains)."""
    if text_model:
        return HFTextEncoder(text_model, hidden, finetune=finetune,
                             trust_remote_code=trust_remote_code)
    if dims.get("text_input", "features") != "features":
        raise ValueError("text: the data has only text_bert ids; pass text_model=<local HF path>")
    return FeatureTextEncoder(dims.get("text", 768), hidden, dropout)


def encode_text(encoder: nn.Module, batch: dict):
    if isinstance(encoder, HFTextEncoder):
        return encoder(batch["text_bert"], batch["text_mask"])
    return encoder(batch["text"], batch["text_mask"])

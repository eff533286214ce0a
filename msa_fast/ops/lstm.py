"""``msa_fast::lstm``: the unidirectional, batch-first LSTM of an encoder in inference mode
(:class:`msa_fast.models.encoders.SLSTMEncoder` with ``inference_op=True``, which the Predictor
sets on its copy of the model), as one registered op (``torch.library.custom_op``) that every
runtime sees whole. This file imports torch alone: an AOTInductor package calls the op by name,
and ``msa-fast export`` copies this file beside it for loaders without msa_fast.

``lstm(x (B, L, I), weights [w_ih, w_hh, b_ih, b_hh] * layers, hidden) -> (B, L, hidden)``, the
top layer's outputs at every step, zero initial state; PyTorch's gate order (i, f, g, o) and
weight layout (``nn.LSTM._flat_weights`` with biases). Padding is the caller's matter: an LSTM is
causal, so the valid steps of a right-padded row equal its packed run
(:func:`msa_fast.models.encoders.valid_outputs` takes the last valid step).

Why one op rather than ``torch.lstm`` in the traced graph:

- **ONNX.** ``torch.export`` decomposes ``aten.lstm`` into one cell per time step, which
  fixes the batch and every LSTM length in the exported graph (AGFN's audio / vision, 50-500
  steps, hundreds of small nodes). The op instead exports as ONNX's own ``LSTM`` node
  (:func:`onnx_translations`): one node per layer, dynamic batch and length, ONNX Runtime's
  fused kernel. The gates are reordered (i, f, g, o -> i, o, f, c) from the weights inside the
  graph, which ONNX Runtime folds into constants when it loads the file.
- **torch.compile / AOTInductor.** The graph calls ATen's fused CPU LSTM as one opaque kernel,
  instead of Inductor's code for the unrolled cells.

Inference only: no autograd (the Predictor runs under ``inference_mode``).
"""

from __future__ import annotations

import torch


@torch.library.custom_op("msa_fast::lstm", mutates_args=())
def lstm(x: torch.Tensor, weights: list[torch.Tensor], hidden: int) -> torch.Tensor:
    layers = len(weights) // 4
    h0 = x.new_zeros(layers, x.shape[0], hidden)
    out = torch.lstm(x, (h0, h0), weights, True, layers, 0.0, False, False, True)[0]
    return out.contiguous()  # batch_first output is a transposed view; the fake is contiguous


@lstm.register_fake
def _lstm_fake(x, weights, hidden):
    return x.new_empty(x.shape[0], x.shape[1], hidden)


def lstm_weights(module: torch.nn.LSTM) -> list[torch.Tensor]:
    """``[w_ih, w_hh, b_ih, b_hh] * layers`` of a unidirectional ``nn.LSTM`` with biases and no
    projection, from its public parameters."""
    return [getattr(module, f"{kind}_l{k}") for k in range(module.num_layers)
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]


def onnx_translations() -> dict:
    """``{op: onnxscript function}`` for ``torch.onnx.export(custom_translation_table=...)``
    (needs ``onnxscript``, the ``[onnx]`` extra)."""
    from onnxscript import opset18 as op

    def reorder(w):  # PyTorch's gate blocks i, f, g, o -> ONNX's i, o, f, c
        i, f, g, o = op.Split(w, num_outputs=4, axis=0)
        return op.Concat(i, o, f, g, axis=0)

    def lstm_onnx(x, weights, hidden: int):
        y = op.Transpose(x, perm=[1, 0, 2])  # ONNX LSTM: (L, B, I)
        for layer in range(len(weights) // 4):
            w_ih, w_hh, b_ih, b_hh = weights[4 * layer: 4 * layer + 4]
            w = op.Unsqueeze(reorder(w_ih), [0])
            r = op.Unsqueeze(reorder(w_hh), [0])
            b = op.Unsqueeze(op.Concat(reorder(b_ih), reorder(b_hh), axis=0), [0])
            out, _, _ = op.LSTM(y, w, r, b, hidden_size=hidden)  # (L, 1 direction, B, H)
            y = op.Squeeze(out, [1])
        return op.Transpose(y, perm=[1, 0, 2])

    return {torch.ops.msa_fast.lstm.default: lstm_onnx}


__all__ = ["lstm", "lstm_weights", "onnx_translations"]

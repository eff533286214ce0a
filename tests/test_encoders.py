"""SLSTMEncoder: the padded (unidirectional) run equals the packed one, forward and backward."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from msa_fast.models.encoders import SLSTMEncoder


def _packed(enc, x, mask):
    B, L, _ = x.shape
    lengths = (L - mask.sum(1)).clamp(min=1).cpu()
    out, (h, _) = enc.lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    seq, _ = pad_packed_sequence(out, batch_first=True, total_length=L)
    return seq, h[-1]


@pytest.mark.parametrize("layers", [1, 2])
def test_padded_lstm_equals_packed(layers):
    torch.manual_seed(layers)
    enc = SLSTMEncoder(7, hidden=12, layers=layers)
    x = torch.randn(5, 37, 7, requires_grad=True)
    lengths = torch.tensor([37, 1, 20, 0, 36])  # full, one frame, some, none (-> 1), all but one
    mask = torch.arange(37)[None, :] >= lengths[:, None]
    seq, pooled = enc(x, mask)
    want_seq, want_pooled = _packed(enc, x, mask)
    torch.testing.assert_close(seq, want_seq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, want_pooled, rtol=1e-5, atol=1e-6)
    assert (seq[2, 20:] == 0).all() and (seq[3, 1:] == 0).all()
    go_s, go_p = torch.randn_like(seq), torch.randn_like(pooled)
    params = [x, *enc.parameters()]
    got = torch.autograd.grad((seq * go_s).sum() + (pooled * go_p).sum(), params)
    want = torch.autograd.grad((want_seq * go_s).sum() + (want_pooled * go_p).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (got[0][2, 20:] == 0).all()  # padded frames get no gradient


def test_no_mask_and_bidirectional():
    enc = SLSTMEncoder(4, hidden=6)
    x = torch.randn(3, 9, 4)
    seq, pooled = enc(x)
    torch.testing.assert_close(pooled, seq[:, -1])
    bi = SLSTMEncoder(4, hidden=6, bidirectional=True)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[1, 5:] = True
    seq, pooled = bi(x, mask)
    assert seq.shape == (3, 9, 12) and pooled.shape == (3, 12) and (seq[1, 5:] == 0).all()

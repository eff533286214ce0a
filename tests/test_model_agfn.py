"""AGFN model (msa_fast/models/agfn.py): shapes, gradients, learning, the auxiliary
entropy-logit CE, VAT, dropped modalities, backend invariance (eager == triton under the
interpreter), bad config, registry, CLI."""

import os
import tempfile

import pytest
import torch

os.environ.setdefault("MSA_FAST_CACHE", os.path.join(tempfile.gettempdir(), "msa_fast_test_cache"))

import msa_fast  # noqa: E402
from msa_fast.data import load_data  # noqa: E402
from msa_fast.data.loader import gather_batch  # noqa: E402
from msa_fast.models import build_model  # noqa: E402
from msa_fast.models.agfn import AGFN  # noqa: E402
from msa_fast.ops import sentiment_classes  # noqa: E402

SMALL = {"d": 8, "heads": 2, "ffn_dim": 12, "hidden": 12, "av_hidden": 6}
DIMS = {"text": 10, "audio": 5, "vision": 7, "text_input": "features"}


def _random_batch(B=3, lengths=((5, 2, 4), (4, 4, 1), (6, 3, 6)), dims=DIMS) -> dict:
    """Random features (never zeros) with ragged lengths: t, a, v lengths per sample."""
    lens = torch.tensor(lengths).T  # (3 modalities, B)
    batch = {"labels": torch.randn(B), "index": torch.arange(B),
             "present": torch.ones(B, 3, dtype=torch.bool)}
    for i, m in enumerate(("text", "audio", "vision")):
        L = int(lens[i].max())
        mask = torch.arange(L)[None, :] >= lens[i][:, None]
        x = torch.randn(B, L, dims[m]).masked_fill(mask[..., None], 0.0)
        batch[m], batch[f"{m}_mask"], batch[f"{m}_lengths"] = x, mask, lens[i].clone()
    return batch


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    return load_data("synthetic:tiny:limit=48")


def test_output_shapes_and_gate_weights(tiny):
    model = build_model("agfn", tiny.dims, **SMALL)
    batch = gather_batch(tiny["train"], torch.arange(7))
    out = model(batch)
    assert out["pred"].shape == (7,) and out["pred"].dtype == torch.float32
    assert out["loss_extra"].shape == ()  # the auxiliary CE (lambda_u 0.1); vat off by default
    assert model.utterance_vectors(batch).shape == (7, 3, SMALL["d"])
    e, g, H = model.fusion.last_weights
    assert e.shape == g.shape == H.shape == (7, 3)
    torch.testing.assert_close(e.sum(-1), torch.ones(7))
    assert ((H >= 0) & (H <= 1)).all()
    assert model.fusion.tau == 0.05 and model.fusion.entropy_logits.shape == (7, 3, 7)
    model.eval()
    assert "loss_extra" not in model(batch)


def _aux_ce(model, batch, present=None):
    """The auxiliary CE computed by hand from the clean pass's entropy logits."""
    u = model.fusion.entropy_logits
    y = sentiment_classes(batch["labels"], "7")
    assert int(y.min()) >= 0 and int(y.max()) <= 6
    ce = torch.stack([torch.nn.functional.cross_entropy(u[:, m], y, reduction="none") for m in range(3)], 1)
    if present is None:
        return ce.mean()
    return ce[present].mean()


def test_auxiliary_entropy_logit_ce_is_added():
    torch.manual_seed(8)
    batch = _random_batch(B=4, lengths=((5, 2, 4), (4, 4, 1), (6, 3, 6), (2, 2, 2)))
    batch["labels"] = torch.tensor([-2.6, 0.4, 1.6, 3.0])
    model = AGFN(DIMS, dropout=0.0, lambda_u=0.3, **SMALL)
    out = model(batch)
    want = _aux_ce(model, batch)
    torch.testing.assert_close(out["loss_extra"], 0.3 * want)
    torch.testing.assert_close(out["loss_u"], want)
    # the CE trains the entropy logits and, through them, the encoders
    out["loss_extra"].backward()
    assert model.fusion.W_u.grad.abs().sum() > 0 and model.audio.parameters().__next__().grad is not None
    # lambda_u = 0 and entropy_source="features" add nothing
    for cfg in ({"lambda_u": 0.0}, {"entropy_source": "features"}):
        other = AGFN(DIMS, dropout=0.0, **cfg, **SMALL)
        assert "loss_extra" not in other(batch), cfg
    assert not hasattr(AGFN(DIMS, entropy_source="features", **SMALL).fusion, "W_u")


def test_auxiliary_ce_masks_dropped_modalities():
    torch.manual_seed(9)
    batch = _random_batch()
    present = torch.tensor([[True, False, True], [True, True, True], [False, False, True]])
    batch["present"] = present
    model = AGFN(DIMS, dropout=0.0, **SMALL)
    out = model(batch)
    torch.testing.assert_close(out["loss_u"], _aux_ce(model, batch, present))
    assert not torch.allclose(out["loss_u"], _aux_ce(model, batch))  # the mask matters here
    # no gradient flows from the dropped pairs: a dropped modality's logits get none
    u = model.fusion.entropy_logits
    (grad,) = torch.autograd.grad(out["loss_extra"], u)
    assert (grad[~present] == 0).all() and (grad[present].abs().sum(-1) > 0).all()


def test_backward_reaches_every_parameter():
    model = AGFN(DIMS, **SMALL)
    out = model(_random_batch())
    loss = (out["pred"] - torch.randn(3)).abs().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # every encoder contributes: a zero gradient would mean a modality is cut off
    for enc in ("text", "audio", "vision", "proj", "cross", "fusion", "head"):
        total = sum(p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith(enc))
        assert total > 0, enc


def test_optimizer_steps_reduce_loss_on_fixed_batch():
    torch.manual_seed(1)
    model = AGFN(DIMS, dropout=0.0, **SMALL)
    batch = _random_batch(B=6, lengths=((5, 2, 4), (4, 4, 1), (6, 3, 6), (1, 5, 2), (3, 3, 3), (2, 6, 5)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_fn():
        return torch.nn.functional.l1_loss(model(batch)["pred"], batch["labels"])

    first = loss_fn().item()
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.5 * first


def test_vat_adds_a_penalty_in_training_only():
    batch = _random_batch()
    torch.manual_seed(3)
    plain = AGFN(DIMS, dropout=0.0, **SMALL)
    torch.manual_seed(3)
    vat = AGFN(DIMS, dropout=0.0, vat=True, vat_eps=0.5, vat_weight=2.0, **SMALL)
    out_plain, out_vat = plain(batch), vat(batch)
    # same weights, same prediction: VAT only adds a term
    torch.testing.assert_close(out_plain["pred"], out_vat["pred"])
    extra = out_vat["loss_extra"] - out_plain["loss_extra"]  # both hold the same auxiliary CE
    torch.testing.assert_close(out_vat["loss_u"], out_plain["loss_u"])
    assert extra.dim() == 0 and torch.isfinite(extra) and extra > 0
    # the clean pass's gate weights and entropy logits survive the adversarial passes
    for a, b in zip(vat.fusion.last_weights, plain.fusion.last_weights):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(vat.fusion.entropy_logits, plain.fusion.entropy_logits)
    # the penalty trains the encoders too (gradient through the utterance vectors)
    extra.backward()
    assert vat.text.proj[1].weight.grad.abs().sum() > 0
    vat.eval()
    assert "loss_extra" not in vat(batch)


def test_vat_direction_is_adversarial():
    """The power-iteration direction changes the output more than any of 20 random ones of the same norm."""
    torch.manual_seed(4)
    model = AGFN(DIMS, dropout=0.0, vat=True, vat_eps=0.3, vat_xi=1e-2, **SMALL)
    batch = _random_batch()
    with torch.no_grad():
        U = model.utterance_vectors(batch)
        pred = model.predict_from_utterances(U)
    adv = model._vat_loss(U, pred).item()
    rand = []
    for _ in range(20):
        r = torch.randn_like(U)
        r = 0.3 * r / r.flatten(1).norm(dim=1).view(-1, 1, 1)
        with torch.no_grad():
            rand.append((model.predict_from_utterances(U + r) - pred).pow(2).mean().item())
    assert adv > max(rand)


@pytest.mark.parametrize("present", [[True, False, True], [False, True, False], [False, False, True]])
def test_dropped_modalities_are_finite_and_ignored(present):
    torch.manual_seed(5)
    model = AGFN(DIMS, dropout=0.0, vat=True, **SMALL)
    batch = _random_batch()
    batch["present"] = torch.tensor([present, [True] * 3, present])
    out = model(batch)
    assert torch.isfinite(out["pred"]).all() and torch.isfinite(out["loss_extra"])
    (out["pred"].sum() + out["loss_extra"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # a dropped modality's content does not reach the prediction (rows 0 and 2 dropped it)
    other = dict(batch)
    for i, m in enumerate(("text", "audio", "vision")):
        if not present[i]:
            noise = 10 * torch.randn_like(batch[m])
            noise[1] = 0.0  # row 1 has every modality
            other[m] = batch[m] + noise
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(other)["pred"], model(batch)["pred"])


def test_all_keys_padded_gives_finite_output():
    # sample 0: text present alone, so its key set (audio + vision) is fully masked
    model = AGFN(DIMS, **SMALL).eval()
    batch = _random_batch()
    batch["present"][0] = torch.tensor([True, False, False])
    with torch.no_grad():
        U = model.utterance_vectors(batch)
    assert torch.isfinite(U).all()
    assert (U[0, 1:] == 0).all() and (U[0, 0] != 0).any()


def test_dropped_modality_keys_are_masked():
    """A dropped modality is no key: its (padded) length cannot change anyone's output."""
    torch.manual_seed(7)
    model = AGFN(DIMS, **SMALL).eval()
    batch = _random_batch()
    batch["present"][0, 1] = False  # row 0: audio dropped, audio length 5
    shorter = dict(batch, audio_mask=batch["audio_mask"].clone(), audio_lengths=batch["audio_lengths"].clone())
    shorter["audio_mask"][0, 1:] = True
    shorter["audio_lengths"][0] = 1
    with torch.no_grad():
        a, b = model.utterance_vectors(batch), model.utterance_vectors(shorter)
    torch.testing.assert_close(a, b)
    # whereas for a present modality the same change matters (the test can fail)
    batch["present"][0, 1] = True
    shorter["present"] = batch["present"]
    with torch.no_grad():
        assert not torch.allclose(model.utterance_vectors(batch)[0, 0], model.utterance_vectors(shorter)[0, 0])


@pytest.mark.interpret
def test_eager_and_triton_backends_agree():
    torch.manual_seed(6)
    model = AGFN(DIMS, **SMALL).eval()
    batch = _random_batch(B=2, lengths=((3, 2, 3), (2, 2, 1)))
    batch["present"][1, 2] = False
    results = {}
    for backend in ("eager", "triton"):
        model.zero_grad()
        with msa_fast.use_backend(backend):
            pred = model(batch)["pred"]
        pred.sum().backward()
        results[backend] = (pred.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results["triton"][0], results["eager"][0], rtol=1e-4, atol=1e-5)
    for ge, gt in zip(results["eager"][1], results["triton"][1]):
        torch.testing.assert_close(gt, ge, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg, name", [
    ({"d": 10, "heads": 4}, "heads"),
    ({"dropout": -0.1}, "dropout"),
    ({"dropout": 1.0}, "dropout"),
    ({"d": 0}, "d"),
    ({"tau": 0.0}, "tau"),
    ({"vat_eps": -1.0}, "vat_eps"),
    ({"vat_xi": 0}, "vat_xi"),
    ({"vat_weight": -0.5}, "vat_weight"),
    ({"vat": "yes"}, "vat"),
    ({"ffn_dim": -1}, "ffn_dim"),
    ({"hidden": 2.5}, "hidden"),
    ({"entropy_source": "logits"}, "entropy_source"),
    ({"lambda_u": -0.1}, "lambda_u"),
])
def test_bad_config_is_value_error(cfg, name):
    with pytest.raises(ValueError, match=f"AGFN: {name}: expected"):
        AGFN(DIMS, **cfg)


def test_registry_and_unknown_keys(tiny):
    model = build_model("agfn", tiny.dims, lr_schedule="ignored", av_hidden=4)
    assert isinstance(model, AGFN) and model.audio.out_dim == 4


def test_cli_train_smoke(tmp_path, capsys):
    from msa_fast.cli import main

    argv = ["train", "--model", "agfn", "--data", "synthetic:tiny:limit=48", "--epochs", "1",
            "--batch-size", "16", "--seeds", "1", "--no-progress", "--drop-rate", "0.5",
            "--model-cfg", '{"d": 8, "heads": 2, "hidden": 8, "av_hidden": 4, "vat": true}',
            "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert "agfn: test metrics" in capsys.readouterr().out
    assert (tmp_path / "run" / "results.json").exists()

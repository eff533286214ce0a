"""FD-CMDIE model (msa_fast.models.fd_cmdie): shapes, gradients, pair mining, partner
sources, ablation switches, backends, bad config, CLI and presets -- on tiny synthetic data."""

import os
import tempfile

import pytest
import torch

os.environ.setdefault("MSA_FAST_CACHE", os.path.join(tempfile.gettempdir(), "msa_fast_test_cache"))

import msa_fast  # noqa: E402
from msa_fast.data.loader import gather_batch  # noqa: E402
from msa_fast.data.source import load_data  # noqa: E402
from msa_fast.models import build_model  # noqa: E402
from msa_fast.models.encoders import masked_mean  # noqa: E402
from msa_fast.models.fd_cmdie import FDCMDIE  # noqa: E402
from msa_fast.ops import reference  # noqa: E402
from msa_fast.train.trainer import EpochContext  # noqa: E402

DATA = "synthetic:tiny:limit=48"
SMALL = {"d": 8, "heads": 2, "hidden": 8, "k_cl": 3, "partners_per_sample": 2, "dropout": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data():
    return load_data(DATA)


def _ctx(data, epoch=1):
    return EpochContext(epoch, 0, data["train"], data.aligned, 16, torch.device("cpu"), False, False)


def _model(data, **cfg):
    torch.manual_seed(0)
    return build_model("fd_cmdie", data.dims, **dict(SMALL, **cfg))


def _batch(data, rows=range(8), split="train"):
    return gather_batch(data[split], torch.as_tensor(list(rows)))


def test_shapes_train_and_eval(data):
    model = _model(data)
    model.on_epoch_start(_ctx(data))
    batch = _batch(data)
    out = model.train()(batch)
    assert out["pred"].shape == (8,) and out["pred"].dtype == torch.float32
    assert out["loss_extra"].shape == () and torch.isfinite(out["loss_extra"])
    # loss_extra = lambda_cl * L_cl
    torch.testing.assert_close(out["loss_extra"], 0.1 * out["loss_cl"])
    out = model.eval()(batch)
    assert out["pred"].shape == (8,) and "loss_extra" not in out


def test_contrastive_term_is_skipped_before_mining(data):
    model = _model(data).train()
    out = model(_batch(data))  # no on_epoch_start yet: no partners, no crash
    assert "loss_extra" not in out and model.mined is None
    bank = _model(data, partner_source="bank").train()
    assert "loss_extra" not in bank(_batch(data)) and bank.cl_loss is None
    model.on_epoch_start(_ctx(data))
    batch = _batch(data)
    batch.pop("index")  # a caller's own batch without train rows: nothing to pair
    assert "loss_extra" not in model(batch)


def test_backward_reaches_every_parameter(data):
    model = _model(data, dropout=0.1)
    model.on_epoch_start(_ctx(data))
    model.train()
    batch = _batch(data, range(16))
    out = model(batch)
    loss = (out["pred"] - batch["labels"]).abs().mean() + out["loss_extra"]
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_contrastive_gradient_reaches_the_partners(data):
    """Forward partners run through the encoders with gradients: the contrastive term alone
    moves the encoders, and changes when a partner's input changes."""
    model = _model(data)
    model.on_epoch_start(_ctx(data))
    model.train()
    batch = _batch(data, [0])
    out = model(batch)
    grads = torch.autograd.grad(out["loss_extra"], list(model.audio.parameters()))
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    partners = model.mined.pos_idx[0]
    partners = partners[partners >= 0]
    assert partners.numel()
    model.partners_per_sample = None  # use every partner, so the changed one is always drawn
    before = model(batch)["loss_extra"]
    model._train_split = model._train_split.subset(torch.arange(len(data["train"])))
    model._train_split.audio[partners] += 3.0
    after = model(batch)["loss_extra"]
    assert not torch.allclose(before, after)


def test_a_few_steps_reduce_the_loss(data):
    model = _model(data)
    model.on_epoch_start(_ctx(data))
    model.train()
    batch = _batch(data, range(16))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(15):
        out = model(batch)
        loss = (out["pred"] - batch["labels"]).abs().mean() + out["loss_extra"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_mining_matches_mine_pairs_on_the_same_features(data):
    model = _model(data, k_cl=4, mine_batch_size=7)  # several mining batches of different lengths
    model.on_epoch_start(_ctx(data))
    split = data["train"]
    model.eval()
    with torch.no_grad():  # eq. 8 by hand: the whole split in one batch
        feats, masks = model.encode(gather_batch(split, torch.arange(len(split))))
        f = torch.cat([masked_mean(x, m) for x, m in zip(feats, masks)], dim=1)
    labels = reference.sentiment_classes(split.labels, "7")
    want = reference.mine_pairs(f, labels, 4)
    assert torch.equal(model.mined.pos_idx, want.pos_idx)
    assert torch.equal(model.mined.neg_idx, want.neg_idx)
    torch.testing.assert_close(model.mined.pos_sim, want.pos_sim, equal_nan=True, rtol=1e-4, atol=1e-5)
    pos, neg = model.mined.pos_idx, model.mined.neg_idx
    rows = torch.arange(len(split))[:, None].expand_as(pos)
    ok = pos >= 0
    assert ok.any() and (labels[pos[ok]] == labels[rows[ok]]).all() and (pos[ok] != rows[ok]).all()
    okn = neg >= 0
    assert (labels[neg[okn]] != labels[rows[okn]]).all()
    assert model.training is False  # on_epoch_start restores the caller's mode
    model.train()
    model.on_epoch_start(_ctx(data))
    assert model.training


@pytest.mark.parametrize("scheme", ["2", "3"])
def test_label_scheme(data, scheme):
    model = _model(data, label_scheme=scheme)
    model.on_epoch_start(_ctx(data))
    labels = reference.sentiment_classes(data["train"].labels, scheme)
    pos = model.mined.pos_idx
    rows = torch.arange(pos.shape[0])[:, None].expand_as(pos)
    assert (labels[pos[pos >= 0]] == labels[rows[pos >= 0]]).all()


def test_partners_are_subsampled(data):
    model = _model(data, k_cl=5, partners_per_sample=2)
    model.on_epoch_start(_ctx(data))
    idx = model.mined.pos_idx[:6]
    picked = model._sample_partners(idx, {})
    assert picked.shape == (6, 2)
    for r in range(6):
        valid = set(idx[r][idx[r] >= 0].tolist())
        got = picked[r][picked[r] >= 0].tolist()
        assert set(got) <= valid and len(got) == min(2, len(valid)) and len(set(got)) == len(got)
    model.partners_per_sample = None
    assert torch.equal(model._sample_partners(idx, {}), idx)


def test_bank_partner_source(data):
    model = _model(data, partner_source="bank")
    model.on_epoch_start(_ctx(data))
    assert model.cl_loss.partner_source == "bank" and model.cl_loss.num_samples == len(data["train"])
    assert not any("bank" in k or "filled" in k for k in model.state_dict())  # not checkpointed
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for s in range(0, 48, 16):
        batch = _batch(data, range(s, s + 16))
        out = model(batch)
        assert torch.isfinite(out["loss_extra"])
        first = out["loss_extra"] if first is None else first
        loss = (out["pred"] - batch["labels"]).abs().mean() + out["loss_extra"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert bool(model.cl_loss.filled.all())
    # the rows written are the batch's own pooled decoupled features (detached; dropout 0)
    model(_batch(data, range(32, 48)))
    with torch.no_grad():
        sim, diff = model._vectors(_batch(data, range(32, 48)))
    torch.testing.assert_close(model.cl_loss.bank[32:48, 0], sim)
    torch.testing.assert_close(model.cl_loss.bank[32:48, 1], diff)
    # a second epoch with the same N keeps the bank
    bank = model.cl_loss
    model.on_epoch_start(_ctx(data, 2))
    assert model.cl_loss is bank


def _param_names(model):
    return {n for n, _ in model.named_parameters()}


def test_ablation_switches_change_the_computation(data):
    full = _model(data)
    full.on_epoch_start(_ctx(data))
    batch = _batch(data)
    full.eval()
    ref = full(batch)["pred"]
    names = _param_names(full)

    no_cl = _model(data, no_cl=True)
    no_cl.on_epoch_start(_ctx(data))
    assert no_cl.mined is None and "loss_extra" not in no_cl.train()(batch)
    assert _param_names(no_cl) == names  # same network, no contrastive term
    assert "loss_extra" in full.train()(batch)
    full.eval()

    no_cmdie = _model(data, no_cmdie=True)
    assert no_cmdie.cmdie is None and not any(n.startswith("cmdie.") for n in _param_names(no_cmdie))
    assert no_cmdie.head[0].in_features == 6 * SMALL["d"]

    no_gap = _model(data, no_gap=True)
    assert _param_names(no_gap) == {n for n in names if ".pools." not in n}
    assert any(".pools." in n for n in names)

    no_x2 = _model(data, no_crossatt2=True)
    assert _param_names(no_x2) == {n for n in names if "norm_g3" not in n and "norm_x3" not in n}
    assert any("norm_g3" in n for n in names)

    # same shared weights, different computation -> different outputs
    for ablated in (no_gap, no_x2):
        ablated.load_state_dict(full.state_dict(), strict=False)
        out = ablated.eval()(batch)["pred"]
        assert out.shape == ref.shape and not torch.allclose(out, ref, atol=1e-4)
    assert not torch.allclose(no_cmdie.eval()(batch)["pred"], ref, atol=1e-4)


def test_global_feature_modes(data):
    batch = _batch(data)
    concat = _model(data, global_feature="concat").eval()
    mean = _model(data, global_feature="mean").eval()
    auto = _model(data).eval()
    sims = [torch.randn(2, 5, 8) for _ in range(3)]
    masks = [torch.zeros(2, 5, dtype=torch.bool) for _ in range(3)]
    masks[1][0, 3:] = True
    G, gm = mean._global_feature(sims, masks)
    keep = torch.stack([~m for m in masks]).float()[..., None]
    torch.testing.assert_close(G, (torch.stack(sims) * keep).sum(0) / keep.sum(0))
    assert not gm.any()
    G, gm = concat._global_feature(sims, masks)
    assert G.shape == (2, 15, 8) and torch.equal(gm[:, 5:10], masks[1])
    # aligned data: auto = mean; unequal lengths: auto = concat, mean refuses
    torch.testing.assert_close(auto._global_feature(sims, masks)[0], mean._global_feature(sims, masks)[0])
    short = [sims[0], sims[1][:, :3], sims[2]]
    smasks = [masks[0], masks[1][:, :3], masks[2]]
    assert auto._global_feature(short, smasks)[0].shape == (2, 13, 8)
    with pytest.raises(ValueError, match="global_feature"):
        mean._global_feature(short, smasks)
    assert concat(batch)["pred"].shape == (8,)


def test_unaligned_and_missing_modalities(data):
    un = load_data("synthetic:tiny:unaligned:limit=8")
    model = _model(un)
    batch = gather_batch(un["train"], torch.arange(4))
    batch["audio"], batch["audio_mask"] = batch["audio"][:, :12], batch["audio_mask"][:, :12]
    batch["vision"], batch["vision_mask"] = batch["vision"][:, :16], batch["vision_mask"][:, :16]
    assert torch.isfinite(model.eval()(batch)["pred"]).all()
    batch = _batch(data, range(4))
    batch["present"][0, 1] = False  # sample 0 without audio
    model_aligned = _model(data).eval()
    p1 = model_aligned(batch)["pred"]
    batch["audio"] = batch["audio"].clone()
    batch["audio"][0] += 5.0  # a dropped modality's content never matters
    p2 = model_aligned(batch)["pred"]
    torch.testing.assert_close(p1, p2)
    assert torch.isfinite(p1).all()


def _random_batch(B=2, L=(4, 3, 5)):
    g = torch.Generator().manual_seed(3)
    lens = [torch.tensor([n, n - 2]) for n in L]
    batch = {"text": torch.randn(B, L[0], 768, generator=g), "audio": torch.randn(B, L[1], 5, generator=g),
             "vision": torch.randn(B, L[2], 20, generator=g), "labels": torch.randn(B, generator=g),
             "index": torch.arange(B), "present": torch.ones(B, 3, dtype=torch.bool)}
    for m, n, ln in zip(("text", "audio", "vision"), L, lens):
        batch[f"{m}_mask"] = torch.arange(n)[None] >= ln[:, None]
        batch[f"{m}_lengths"] = ln
    return batch


@pytest.mark.interpret
def test_eager_and_triton_backends_agree(data):
    """Under msa_fast.use_backend the CMDIE ops (attention, add+LayerNorm, GAP) switch
    kernels; predictions and gradients stay equal (triton interpreted on the CPU)."""
    model = _model(data, d=4, heads=2, layers=1, global_feature="concat").eval()
    batch = _random_batch()
    results = []
    for backend in ("eager", "triton"):
        with msa_fast.use_backend(backend):
            model.zero_grad()
            pred = model(batch)["pred"]
            (pred * torch.tensor([1.0, -2.0])).sum().backward()
            results.append((pred.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("cfg, name", [
    ({"partner_source": "memory"}, "partner_source"),
    ({"k_cl": 0}, "k_cl"),
    ({"d": 10, "heads": 4}, "heads"),
    ({"layers": 0}, "layers"),
    ({"tau": 0.0}, "tau"),
    ({"lambda_cl": -1.0}, "lambda_cl"),
    ({"partners_per_sample": 0}, "partners_per_sample"),
    ({"label_scheme": "5"}, "label_scheme"),
    ({"global_feature": "sum"}, "global_feature"),
    ({"no_gap": "yes"}, "no_gap"),
    ({"dropout": 1.0}, "dropout"),
])
def test_bad_config(data, cfg, name):
    with pytest.raises(ValueError, match=f"FDCMDIE: {name}: expected"):
        build_model("fd_cmdie", data.dims, **cfg)


def test_unknown_cfg_keys_are_ignored(data):
    model = build_model("fd_cmdie", data.dims, av_hidden=3, vat=True, d=8, heads=2)
    assert model.d == 8


def test_cli_train_smoke(tmp_path, capsys):
    from msa_fast.cli import main

    out = tmp_path / "run"
    args = ["train", "--model", "fd_cmdie", "--data", DATA, "--epochs", "1", "--batch-size", "16",
            "--seeds", "1", "--no-progress", "--out", str(out), "--model-cfg", '{"d": 8, "hidden": 8, "k_cl": 3}']
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "MAE" in printed and "Non0_acc_2" in printed
    assert main(["eval", "--checkpoint", str(out / "seed_1"), "--split", "test"]) == 0


def test_preset_mosi_applies_table_2():
    from msa_fast.cli import build_parser, config_from_args

    for name, bs, k_cl, epochs in (("mosi", 32, 10, 50), ("mosei", 16, 50, 12)):
        cfg = config_from_args(build_parser().parse_args(["train", "--model", "fd_cmdie", "--preset", name]))
        assert (cfg.batch_size, cfg.lr, cfg.epochs) == (bs, 1e-4, epochs)
        m = cfg.model_cfg
        assert (m["k_cl"], m["tau"], m["margin"], m["layers"], m["lambda_tri"], m["lambda_cl"]) == (
            k_cl, 0.5, 0.5, 3, 0.1, 0.1)
    assert FDCMDIE.presets["mosei"]["model"]["partner_source"] == "bank"
    cfg = config_from_args(build_parser().parse_args(
        ["train", "--model", "fd_cmdie", "--preset", "mosi", "--lr", "0.001", "--model-cfg", '{"k_cl": 4}']))
    assert cfg.lr == 0.001 and cfg.model_cfg["k_cl"] == 4 and cfg.model_cfg["layers"] == 3


@pytest.mark.interpret
def test_training_step_with_contrastive_loss_is_equal_on_eager_and_triton(data):
    """Training mode: the contrastive term (Triton fused loss) and every gradient match eager;
    the partner subsampling draws the same partners for both (same seed)."""
    model = _model(data, d=4, heads=2, layers=1, global_feature="mean")
    model.on_epoch_start(_ctx(data))
    batch = _batch(data, rows=range(2))
    results = []
    for backend in ("eager", "triton"):
        with msa_fast.use_backend(backend):
            torch.manual_seed(7)
            model.train().zero_grad()
            out = model(batch)
            (out["pred"].sum() + out["loss_extra"]).backward()
            results.append((out["loss_extra"].detach(), [p.grad.clone() for p in model.parameters()
                                                        if p.grad is not None]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)

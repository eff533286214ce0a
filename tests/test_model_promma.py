"""ProMMA (``msa_fast.models.promma``): shapes, gradients, learning, the module switches, the
missing-modality protocols, the evaluator's rule, eager == triton, bad configuration, CLI."""

import os
import tempfile

import pytest
import torch

os.environ.setdefault("MSA_FAST_CACHE", os.path.join(tempfile.gettempdir(), "msa_fast_test_cache"))

import msa_fast  # noqa: E402
from msa_fast.cli import main  # noqa: E402
from msa_fast.data import load_data  # noqa: E402
from msa_fast.data.loader import gather_batch  # noqa: E402
from msa_fast.data.missing import apply_missing_rate, apply_modality_drop  # noqa: E402
from msa_fast.models import build_model  # noqa: E402

DATA = "synthetic:tiny:limit=32"
SMALL = dict(hidden=16, av_hidden=8, heads=2, layers=2, prompt_len=3, gen_len=2, stride=5)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data():
    return load_data(DATA)


def _batch(data, n=8, start=0):
    return gather_batch(data["train"], torch.arange(start, start + n))


def _dropped(batch, pattern):
    """``batch`` with the modalities of ``pattern[b]`` (a tuple per sample) removed the MPLMM way."""
    removed = torch.zeros_like(batch["present"])
    for b, mods in enumerate(pattern):
        removed[b, list(mods)] = True
    out = dict(batch, present=batch["present"] & ~removed)
    for m, key in ((0, "text"), (1, "audio"), (2, "vision")):
        out[key] = batch[key] * (~removed[:, m]).to(batch[key].dtype)[:, None, None]
    return out


def _model(data, **cfg):
    torch.manual_seed(0)
    return build_model("promma", data.dims, **{**SMALL, "dropout": 0.0, **cfg})


def _loss(model, batch):
    out = model(batch)
    loss = (out["pred"] - batch["labels"]).abs().mean()
    return loss + out["loss_extra"] if "loss_extra" in out else loss


def test_output_shapes(data):
    batch = _batch(data, 5)
    out = _model(data)(batch)
    assert out["pred"].shape == (5,) and out["pred"].dtype == torch.float32
    assert out["loss_extra"].shape == () and set(out["aux"]) == {"uni", "gen", "mi", "orth"}
    plain = _model(data, prompts=False)(batch)
    assert plain["pred"].shape == (5,) and "loss_extra" not in plain


@pytest.mark.parametrize("cfg", [{}, {"disentangle": False}, {"dynamic_weighting": False}])
def test_eval_mode_skips_the_losses_not_the_prediction(data, cfg):
    # eval computes only what the prediction needs (matched-pair critic scores, no Gram
    # matrices, no L_uni / L_gen): with dropout 0 its prediction equals training mode's
    batch = apply_modality_drop(_batch(data, 8), 0.5, torch.Generator().manual_seed(3))
    assert (~batch["present"]).any()
    model = _model(data, **cfg)
    with torch.no_grad():
        train = model.train()(batch)
        stats_train = {k: v.clone() for k, v in model.last_stats.items()}
        ev = model.eval()(batch)
    assert "loss_extra" in train and train["loss_extra"] > 0
    assert "loss_extra" not in ev and "aux" not in ev
    torch.testing.assert_close(ev["pred"], train["pred"], rtol=1e-6, atol=1e-6)
    for k, v in model.last_stats.items():  # tensors (no host sync in forward), same values
        assert torch.is_tensor(v), k
        torch.testing.assert_close(v, stats_train[k], equal_nan=True)
    assert 0.0 <= float(model.last_stats["imputed"]) <= 1.0


@pytest.mark.parametrize("cfg", [{}, {"prompts": False}, {"disentangle": False, "impute": "always"}])
def test_backward_every_parameter_gets_a_gradient(data, cfg):
    # one to two modalities missing in most samples, so the missing-signal prompts are used
    batch = apply_modality_drop(_batch(data, 8), 0.8, torch.Generator().manual_seed(1))
    assert (~batch["present"]).any()
    model = _model(data, **cfg)
    loss = _loss(model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_a_few_steps_reduce_the_loss(data):
    batch = _batch(data, 16)
    model = _model(data)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = _loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def _copy_shared(src, dst):
    """Load every parameter of ``src`` that ``dst`` has with the same shape."""
    own = dst.state_dict()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in own and own[k].shape == v.shape},
                        strict=False)
    return dst.eval()


@pytest.mark.parametrize("cfg", [{"prompts": False}, {"disentangle": False}, {"dynamic_weighting": False},
                                 {"connection": False}, {"connect_layers": [1]}, {"impute": "never"},
                                 {"impute": "always"}])
def test_each_switch_changes_the_computation(data, cfg):
    batch = apply_modality_drop(_batch(data, 8), 0.8, torch.Generator().manual_seed(2))
    # at initialisation every imputation passes the evaluator, so "always" is compared with a
    # threshold that passes none, and "never" with "always"
    base_cfg = {"never": {"impute": "always"}, "always": {"eval_threshold": 1e-12}}.get(cfg.get("impute"), {})
    base = _model(data, **base_cfg).eval()
    other = _copy_shared(base, _model(data, **cfg))
    with torch.no_grad():
        assert not torch.allclose(base(batch)["pred"], other(batch)["pred"], atol=1e-6)


def test_evaluator_imputes_by_the_pseudo_label_rule(data):
    batch = apply_modality_drop(_batch(data, 16), 0.9, torch.Generator().manual_seed(3))
    model = _model(data, eval_threshold=0.05).eval()
    x, mask = model._encode(batch)
    present = batch["present"]
    absent = mask | ~present.t()[..., None]
    with torch.no_grad():
        _, imputed, _, _ = model._evaluate(x, absent, present, None)
        uni = model._unimodal(torch.stack([(x[m] * ~absent[m, ..., None]).sum(1)
                                           / (~absent[m]).sum(1, keepdim=True).clamp(min=1) for m in range(3)]))
        gen_uni = model._unimodal(model._generate(x, absent).mean(2))
    for b in range(16):
        have = [m for m in range(3) if present[b, m]]
        pseudo = sum(float(uni[m, b]) for m in have) / max(len(have), 1)
        for m in range(3):
            want = (not present[b, m]) and bool(have) and abs(float(gen_uni[m, b]) - pseudo) <= 0.05
            assert bool(imputed[m, b]) == want, (b, m)
    # the extremes of the threshold are "never" and "always"
    kept = {}
    for name, kw in (("never", {"impute": "never"}), ("tight", {"eval_threshold": 1e-12}),
                     ("always", {"impute": "always"}), ("loose", {"eval_threshold": 1e12})):
        with torch.no_grad():
            kept[name] = _copy_shared(model, _model(data, **kw))(batch)["pred"]
    torch.testing.assert_close(kept["tight"], kept["never"], rtol=0, atol=0)
    torch.testing.assert_close(kept["loose"], kept["always"], rtol=0, atol=0)


@pytest.mark.parametrize("pattern", [((0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (), ()),
                                     ((1, 2),) * 8, ((0, 1, 2), (0,), (), (), (), (), (), ())])
@pytest.mark.parametrize("cfg", [{}, {"prompts": False}, {"impute": "always"}])
def test_dropped_modalities_give_finite_outputs_and_gradients(data, pattern, cfg):
    batch = _dropped(_batch(data, 8), pattern)
    model = _model(data, **cfg)
    loss = _loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_missing_rate_gives_finite_outputs_and_gradients(data):
    batch = apply_missing_rate(_batch(data, 8), (0.3, 0.5, 0.9), torch.Generator().manual_seed(4))
    batch = apply_modality_drop(batch, 0.5, torch.Generator().manual_seed(5))
    model = _model(data)
    loss = _loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_dropped_modality_is_never_read_and_batch_mates_do_not_matter(data):
    batch = _dropped(_batch(data, 8), [(1,), (0, 2), (2,), (), (0,), (1, 2), (), ()])
    noisy = dict(batch)
    for m, key in ((0, "text"), (1, "audio"), (2, "vision")):
        gone = (~batch["present"][:, m]).to(batch[key].dtype)[:, None, None]
        noisy[key] = batch[key] + gone * torch.randn_like(batch[key])
    model = _model(data).eval()
    with torch.no_grad():
        pred = model(batch)["pred"]
        torch.testing.assert_close(model(noisy)["pred"], pred)
        half = {k: v[:4] if torch.is_tensor(v) else v for k, v in batch.items()}
        torch.testing.assert_close(model(half)["pred"], pred[:4], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_runs_and_stays_close(data):
    # the trainer autocasts to bf16 on CUDA; the same mixed dtypes arise under CPU autocast
    batch = _dropped(_batch(data, 8), [(1,), (0, 2), (), (), (2,), (), (), ()])
    model = _model(data).eval()
    with torch.no_grad():
        ref = model(batch)["pred"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(batch)  # dropout 0: the eval prediction, plus the training losses
    assert torch.isfinite(out["pred"]).all() and torch.isfinite(out["loss_extra"])
    torch.testing.assert_close(out["pred"].float().detach(), ref, rtol=0, atol=0.05)
    out["loss_extra"].float().backward()


@pytest.mark.interpret
def test_eager_and_triton_backends_agree(data):
    # tiny: the interpreter costs milliseconds per program (one per batch-head and block)
    batch = _dropped(_batch(data, 2), [(1,), ()])
    results = {}
    for backend in ("eager", "triton"):
        model = _model(data, hidden=16, heads=1, layers=1, stride=10, prompt_len=2, gen_len=2)
        with msa_fast.use_backend(backend):
            out = model(batch)
            loss = (out["pred"] - batch["labels"]).abs().mean() + out["loss_extra"]
            loss.backward()
        results[backend] = (out["pred"].detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["eager"][0], rtol=1e-4, atol=1e-5)
    for name, grad in results["eager"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("cfg, word", [
    ({"hidden": 16, "heads": 3}, "heads"), ({"impute": "sometimes"}, "impute"),
    ({"connect_layers": [2]}, "connect_layers"), ({"eval_threshold": 0.0}, "eval_threshold"),
    ({"lambda_mi": -1.0}, "lambda_mi"), ({"dropout": 1.0}, "dropout"), ({"stride": 0}, "stride"),
    ({"prompts": "yes"}, "prompts"), ({"layers": 0}, "layers"), ({"gen_len": 0}, "gen_len"),
])
def test_bad_configuration_raises_value_error(data, cfg, word):
    with pytest.raises(ValueError, match=word):
        build_model("promma", data.dims, **cfg)


def test_cli_smoke_with_dropped_and_missing_modalities(tmp_path):
    args = ["train", "--model", "promma", "--data", "synthetic:tiny:limit=48", "--epochs", "1",
            "--batch-size", "16", "--no-progress", "--seeds", "1",
            "--model-cfg", '{"hidden": 16, "av_hidden": 8, "stride": 5}']
    assert main([*args, "--drop-rate", "0.5", "--out", str(tmp_path / "drop")]) == 0
    assert main([*args, "--missing-rate", "0.3", "--out", str(tmp_path / "miss")]) == 0
    assert (tmp_path / "drop" / "results.json").exists() and (tmp_path / "miss" / "results.json").exists()

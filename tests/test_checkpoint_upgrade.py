"""Checkpoints of the earlier parameter layouts load (``upgrade_state_dict``) and predict what
the old code predicted: fixtures written by the old code (tests/data/old_checkpoints/make.py,
commit d82b6f3), an AGFN one of that time is refused with a reason, and a current checkpoint
passes the upgrade unchanged."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from msa_fast.models import build_model
from msa_fast.train.checkpoint import CheckpointError, load_weights

HERE = os.path.join(os.path.dirname(__file__), "data", "old_checkpoints")


def _fixture(name):
    tensors = load_file(os.path.join(HERE, f"{name}.safetensors"))
    with open(os.path.join(HERE, f"{name}.json")) as f:
        meta = json.load(f)
    part = lambda p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}  # noqa: E731
    return meta, part("weights."), part("batch."), tensors["expected"]


@pytest.mark.parametrize("name", ["fd_cmdie", "promma"])
def test_old_checkpoint_loads_and_predicts_as_before(name, tmp_path):
    meta, weights, batch, expected = _fixture(name)
    path = str(tmp_path / "old.safetensors")
    save_file(weights, path)
    torch.manual_seed(1)  # other random weights: only the checkpoint can make them agree
    model = build_model(name, meta["dims"], **meta["model_cfg"]).eval()
    with torch.no_grad():
        assert not torch.allclose(model(batch)["pred"], expected, atol=1e-3)
    load_weights(path, model)
    with torch.no_grad():
        got = model(batch)["pred"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fd_cmdie", "promma", "agfn"])
def test_current_checkpoint_passes_unchanged(name):
    dims = {"text": 768, "audio": 5, "vision": 20, "text_input": "features"}
    model = build_model(name, dims)
    state = model.state_dict()
    up = model.upgrade_state_dict(state)
    assert up.keys() == state.keys() and all(up[k] is state[k] for k in state)


def test_old_agfn_checkpoint_is_refused_with_the_reason(tmp_path):
    dims = {"text": 768, "audio": 5, "vision": 20, "text_input": "features"}
    model = build_model("agfn", dims)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("cross.")}
    state["cross.0.q_proj.weight"] = torch.zeros(32, 32)  # the old layout's marker
    path = str(tmp_path / "agfn_old.safetensors")
    save_file(state, path)
    with pytest.raises(CheckpointError, match="before the contract §3.1 dual gate.*retrain"):
        load_weights(path, model)

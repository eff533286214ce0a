"""Writes the pre-refactor checkpoints that tests/test_checkpoint_upgrade.py loads.

Run from a checkout of commit d82b6f3 (the last layout before one ``MultiheadAttention`` /
stacked CMDIE: per-DIPU CMDIE units, ProMMA's own stacked ``(n, in, out)`` linears):

    git worktree add /tmp/old d82b6f3 && cd /tmp/old && PYTHONPATH=. python \
        /path/to/tests/data/old_checkpoints/make.py /path/to/tests/data/old_checkpoints

Each ``<model>.safetensors`` holds the old weights (``weights.<key>``), a small batch
(``batch.<key>``) and the old code's eval-mode predictions on it (``expected``); ``<model>.json``
the model config.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

from msa_fast.models import build_model

DIMS = {"text": 768, "audio": 5, "vision": 20, "text_input": "features"}
CONFIGS = {"fd_cmdie": {"d": 16, "heads": 2, "layers": 2}, "promma": {"hidden": 16, "heads": 2}}


def batch(B=4, Lt=12, La=12, Lv=12):
    g = torch.Generator().manual_seed(0)
    out = {"present": torch.tensor([[1, 1, 1], [1, 0, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)[:B]}
    for m, L in (("text", Lt), ("audio", La), ("vision", Lv)):
        lens = torch.randint(1, L + 1, (B,), generator=g)
        lens[0] = L
        mask = torch.arange(L)[None] >= lens[:, None]
        out[m] = torch.randn(B, L, DIMS[m], generator=g) * (~mask).unsqueeze(-1)
        out[f"{m}_mask"], out[f"{m}_lengths"] = mask, lens
    return out


def main(out_dir):
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        model = build_model(name, DIMS, **cfg).eval()
        b = batch()
        with torch.no_grad():
            expected = model(b)["pred"]
        tensors = {f"weights.{k}": v.contiguous() for k, v in model.state_dict().items()}
        tensors.update({f"batch.{k}": v.contiguous() for k, v in b.items()})
        tensors["expected"] = expected.contiguous()
        save_file(tensors, os.path.join(out_dir, f"{name}.safetensors"))
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump({"model": name, "dims": DIMS, "model_cfg": cfg}, f, indent=1)
        print(name, expected.tolist())


if __name__ == "__main__":
    main(sys.argv[1])

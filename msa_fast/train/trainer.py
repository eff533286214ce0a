"""One training run (one seed): AdamW on ``L1(pred, y) + loss_extra``, MMSA's early stopping,
atomic checkpoints with resume, test evaluation of the best epoch.

Per epoch: train over shuffled batches (order from ``(seed, epoch)``), clip the global grad
norm, then compute the valid loss (mean absolute error over all valid samples). Early
stopping is MMSA's rule: an epoch is better when ``valid_loss <= best - 1e-6``; training
stops when ``epoch - best_epoch >= patience`` (8) or at ``epochs``. (MMSA averages per-batch
losses and rounds to 4 places; the per-sample mean here is the exact MAE.) After training,
the best epoch's weights are evaluated on valid and test with :mod:`msa_fast.metrics`.

A model may define ``on_epoch_start(ctx: EpochContext)``: it is called before every training
epoch (also the first one after a resume) with the train split and the run's settings, so
that a model can do dataset-level work such as FD-CMDIE's pair mining (eq. 7-8). It runs
with the model in whatever mode it sets; the trainer puts the model back in train mode.

A non-finite loss raises :class:`NonFiniteLossError` before any optimizer step or checkpoint
write of that epoch, so the last checkpoint on disk is the last good one. A valid loss that
is non-finite or diverged (above ``DIVERGENCE_FACTOR`` = 100 x the smaller of the first
epoch's valid L1 and ``mean |y_valid|``, the L1 of predicting 0) raises
:class:`DivergedError` (a ``NonFiniteLossError``) before that epoch's checkpoint is written.

Resume (``cfg.resume``): a seed whose ``state.json`` exists continues from it if its stored
configuration equals this one in every result key (else :class:`RunDirError` names the
keys). A larger ``epochs`` continues a seed stopped by the epoch cap, not one stopped by
early stopping (said in the log); a smaller one than already trained is refused. Checkpoint
files without a ``state.json`` are refused, never silently restarted over. On CUDA the
forward runs under ``torch.autocast(dtype=torch.bfloat16)`` when ``amp`` is set.

Crash tests: with the environment variable ``MSA_FAST_KILL_AFTER_EPOCH=N`` (:data:`KILL_ENV`)
every process of the run kills itself with ``SIGKILL`` once epoch ``N``'s checkpoint is on
disk -- the ``kill -9`` that resume must survive, at a known point instead of a race between
a test's poll and the training loop. Unset, nothing happens.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from msa_fast.data.loader import gather_batch, make_loader
from msa_fast.data.missing import MissingProtocol
from msa_fast.data.mmsa import MMSAData, SplitData
from msa_fast.metrics import mosi_regression_metrics, warn_if_implausible
from msa_fast.models import build_model, model_hparams
from msa_fast.train import checkpoint as ckpt
from msa_fast.train.config import TrainConfig
from msa_fast.train.device import resolve_device
from msa_fast.train.distributed import Dist, current, shard_batch
from msa_fast.train.run_dir import RESULT_KEYS, RunDirError, config_diff
from msa_fast.train.seed import cudnn_deterministic, rng_state, set_rng_state, set_seed


class NonFiniteLossError(RuntimeError):
    """A non-finite training loss; the last checkpoint on disk is the last good one."""


class DivergedError(NonFiniteLossError):
    """A valid loss that is non-finite or diverged (see :func:`_check_valid_loss`); the
    epoch's checkpoint is not written, the previous one is intact."""


# A valid L1 this many times the first epoch's (or the constant-0 predictor's) is divergence.
DIVERGENCE_FACTOR = 100.0
log = logging.getLogger("msa_fast.train")


@dataclass
class EpochContext:
    """What ``model.on_epoch_start`` receives. ``train`` is the whole train split (its row
    ``i`` is the sample whose batches carry ``index == i``)."""

    epoch: int
    seed: int
    train: SplitData
    aligned: bool
    batch_size: int
    device: torch.device
    amp: bool | str
    progress: bool
    dist: Dist = field(default_factory=Dist)  # the data-parallel group (one process: trivial)

    def batch(self, rows: torch.Tensor) -> dict:
        """Rows ``rows`` of the train split as a loader batch on :attr:`device`."""
        return to_device(gather_batch(self.train, rows), self.device)

    def autocast(self):
        """The run's autocast (see :func:`autocast_enabled`)."""
        return _autocast(self.device, self.amp)


def to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast_enabled(device: torch.device, amp: bool | str) -> bool:
    """Whether a run with config ``amp`` computes under bf16 autocast on ``device``: ``True``
    (the default, ``--amp auto``) on CUDA only, ``"bf16"`` on every device (``--amp bf16``:
    the CPU's bf16 GEMMs, oneDNN with AVX512-BF16 / AMX where the CPU has them), ``False``
    (``--amp off``) never. Losses and the metrics' predictions stay fp32."""
    return amp == "bf16" or (amp is True and device.type == "cuda")


def _autocast(device: torch.device, amp: bool | str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_enabled(device, amp))


@torch.no_grad()
def predict(model: nn.Module, loader, device, amp: bool | str = True, dist: Dist | None = None):
    """(preds, labels) over a loader (which applies the missing-modality protocol), float32 on
    the CPU, in the loader's order. Under a data-parallel ``dist`` each rank runs every
    ``world``-th batch and all get every row."""
    model.eval()

    def run(batch):
        batch = to_device(batch, device)
        with _autocast(device, amp):
            out = model(batch)
        return out["pred"].float().cpu(), batch["labels"].float().cpu()

    parts = (dist or Dist()).gather_batches(loader, run)
    return torch.cat([p for p, _ in parts]), torch.cat([y for _, y in parts])


def evaluate(model, data: MMSAData, split: str, cfg: TrainConfig, device, seed: int) -> dict:
    loader = make_loader(data[split], cfg.batch_size, shuffle=False, seed=seed, aligned=data.aligned,
                         protocol=MissingProtocol(cfg.missing_rate, cfg.drop_rate), name=split)
    t0 = time.perf_counter()
    p, y = predict(model, loader, device, cfg.amp, current())
    dt = time.perf_counter() - t0
    warn_if_implausible(p.numpy(), float(data["train"].labels.abs().max()) if len(data["train"]) else None,
                        f"{type(model).__name__} on {split}")
    metrics = mosi_regression_metrics(p, y)
    metrics["Loss"] = round(float((p - y).abs().mean()), 4)
    metrics["samples_per_s"] = round(len(y) / max(dt, 1e-9), 1)
    return metrics


def train_seed(cfg: TrainConfig, data: MMSAData, seed: int, run_dir: str | None) -> dict:
    """Train one seed; returns ``{"seed", "test", "valid", "best_epoch", "history", ...}``.
    ``run_dir`` (or None: no checkpoints) receives the checkpoints of this seed."""
    from msa_fast import use_backend

    previous = torch.get_num_threads()
    if cfg.threads > 0 and resolve_device(cfg.device).type == "cpu":
        torch.set_num_threads(cfg.threads)
    try:
        # the run's backend and MMSA's deterministic cuDNN, both restored afterwards
        with use_backend(cfg.backend), cudnn_deterministic():
            return _train_seed(cfg, data, seed, run_dir)
    finally:
        torch.set_num_threads(previous)


KILL_ENV = "MSA_FAST_KILL_AFTER_EPOCH"


def _kill_after_epoch() -> int | None:
    """The epoch after whose checkpoint the process kills itself (:data:`KILL_ENV`), or None."""
    value = os.environ.get(KILL_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{KILL_ENV}: expected an epoch >= 1, got {value!r}")
    return int(value)


def check_splits(data: MMSAData) -> None:
    """Every split must hold samples: no metric of an untrained or unvalidated model."""
    for name in ("train", "valid", "test"):
        if len(data[name]) == 0:
            raise ValueError(f"data: the {name} split of {data.source or 'the data'} is empty "
                             f"(0 samples); training needs samples in train, valid and test")


def _last_good(run_dir: str | None, state: dict) -> str:
    if run_dir and os.path.exists(os.path.join(run_dir, "state.json")):
        return f"{run_dir} (epoch {state.get('epoch', 0)})"
    return "none written"


def _check_valid_loss(loss: float, state: dict, labels: torch.Tensor, run_dir, seed, epoch):
    """Stop like a non-finite training loss when the valid L1 is non-finite or has diverged:
    above ``DIVERGENCE_FACTOR`` x the smaller of the first epoch's valid L1 and the L1 of
    predicting 0 everywhere (``mean |y|``, at least 0.1) -- a model can always do as well
    as the constant 0, so a hundred times worse is divergence, not learning."""
    # a non-finite first_valid is this epoch's own loss, which raises below anyway
    bound = DIVERGENCE_FACTOR * min(state["first_valid"], max(float(labels.abs().mean()), 0.1))
    if not math.isfinite(loss) or loss > bound:
        what = "non-finite" if not math.isfinite(loss) else f"diverged (above {bound:.4g})"
        raise DivergedError(
            f"valid loss {what}: {loss:.6g} at seed {seed} epoch {epoch}; "
            f"last good checkpoint: {_last_good(run_dir, state)}")


def _resume_state(cfg: TrainConfig, seed: int, run_dir: str) -> dict | None:
    """The state to continue from (None: start this seed afresh), after checking that the
    checkpoint belongs to this configuration and what a changed ``epochs`` means."""
    state_path = os.path.join(run_dir, "state.json")
    if not cfg.resume:
        return None
    if not os.path.exists(state_path):
        left = sorted(f for f in os.listdir(run_dir) if f.endswith((".safetensors", ".pt"))) \
            if os.path.isdir(run_dir) else []
        if left:
            raise ckpt.CheckpointError(
                f"{state_path} is missing but {run_dir} holds checkpoint files ({', '.join(left)}); "
                f"refusing to restart the seed and delete them (restore state.json, or --overwrite)")
        return None
    state = ckpt.read_state(run_dir)
    diff = config_diff(state["config"], cfg, keys=tuple(k for k in RESULT_KEYS if k != "seeds"))
    if diff:
        raise RunDirError(f"--resume: the configuration differs from the checkpoint in {run_dir} "
                          f"in {len(diff)} key(s) that change the result: {'; '.join(diff)}")
    done = state["epoch"]
    if cfg.epochs < done:
        raise RunDirError(f"epochs (--epochs): {cfg.epochs} is below the {done} epochs seed {seed} "
                          f"already trained in {run_dir}")
    if state.get("finished") and cfg.epochs > done:
        reason = state.get("stop_reason") or (
            "patience" if done - state["best_epoch"] >= cfg.patience else "epochs")
        if reason == "epochs":
            log.warning("seed %s: continuing from epoch %s to --epochs %s", seed, done, cfg.epochs)
            state["finished"] = False
        else:
            log.warning("seed %s: stopped early at epoch %s (best epoch %s, patience %s); a larger "
                     "--epochs does not continue it", seed, done, state["best_epoch"], cfg.patience)
    return state


def _train_seed(cfg: TrainConfig, data: MMSAData, seed: int, run_dir: str | None) -> dict:
    check_splits(data)
    dist = current()
    device = resolve_device(cfg.device)
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)  # one process per GPU
    main = dist.is_main
    set_seed(seed)
    model = build_model(cfg.model, data.dims, **cfg.model_cfg).to(device)
    net = model
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        # unused parameters: a model may skip a branch in a step (e.g. before pairs are mined);
        # buffers are not broadcast, every rank computes the same ones
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=True, broadcast_buffers=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    protocol = MissingProtocol(cfg.missing_rate, cfg.drop_rate)
    train_loader = make_loader(data["train"], cfg.batch_size, shuffle=True, seed=seed,
                               aligned=data.aligned, num_workers=cfg.num_workers, protocol=protocol)
    valid_loader = make_loader(data["valid"], cfg.batch_size, shuffle=False, seed=seed,
                               aligned=data.aligned, protocol=protocol, name="valid")

    kill_after = _kill_after_epoch()
    state = {"best_valid": float("inf"), "best_epoch": 0, "history": [], "finished": False}
    start_epoch = 1
    if run_dir:
        state = _resume_state(cfg, seed, run_dir) or state
        if "rng" in state:
            ckpt.load_checkpoint(run_dir, model, optimizer)
            ranks = state.get("rng_ranks") or []
            set_rng_state(ranks[dist.rank] if dist.active and len(ranks) == dist.world else state["rng"])
            start_epoch = state["epoch"] + 1
    meta = {"model": cfg.model, "model_cfg": cfg.model_cfg,
            "model_hparams": model_hparams(cfg.model, cfg.model_cfg), "dims": data.dims, "data": cfg.data,
            "label_absmax": float(data["train"].labels.abs().max()),
            "aligned": data.aligned, "seed": seed, "config": cfg.to_dict()}

    stop = state["finished"]
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stop:
            break
        on_epoch_start = getattr(model, "on_epoch_start", None)
        if callable(on_epoch_start):
            on_epoch_start(EpochContext(epoch, seed, data["train"], data.aligned, cfg.batch_size,
                                        device, cfg.amp, bool(cfg.progress) and main, dist))
        model.train()
        train_loader.set_epoch(epoch)
        total, n_seen, t0 = 0.0, 0, time.perf_counter()
        bar = tqdm(train_loader, desc=f"seed {seed} epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=None if cfg.progress and main else True,  # None: off when not a TTY
                   unit="batch", dynamic_ncols=True)
        for step, batch in enumerate(bar):
            bs = batch["labels"].shape[0]  # the global batch
            if dist.active:
                rows = dist.shard(bs)
                batch = shard_batch(batch, rows)
            batch = to_device(batch, device)
            with _autocast(device, cfg.amp):
                out = net(batch)
                loss = nn.functional.l1_loss(out["pred"].float(), batch["labels"])
                if "loss_extra" in out:
                    loss = loss + out["loss_extra"].float()
            if dist.active:  # the global mean loss, and whether any rank's is non-finite
                n_mine = len(rows)
                mine = float(loss.detach()) * n_mine if n_mine else 0.0
                stats = dist.all_reduce_sum(torch.tensor(
                    [mine if math.isfinite(mine) else 0.0, float(not math.isfinite(mine))],
                    dtype=torch.float64))
                global_loss = float(stats[0]) / bs if not stats[1] else float("nan")
                weight = dist.world * n_mine / bs  # DDP averages: this makes it the global mean
            else:
                global_loss, weight = loss.item(), 1.0
            if not math.isfinite(global_loss):
                raise NonFiniteLossError(
                    f"non-finite loss ({global_loss}) at seed {seed} epoch {epoch} step {step}; "
                    f"last good checkpoint: {_last_good(run_dir, state)}")
            optimizer.zero_grad(set_to_none=True)
            (loss * weight if dist.active else loss).backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            total += global_loss * bs
            n_seen += bs
            bar.set_postfix(loss=f"{total / n_seen:.4f}",
                            sps=f"{n_seen / (time.perf_counter() - t0):.0f}")
        train_time = time.perf_counter() - t0
        vp, vy = predict(model, valid_loader, device, cfg.amp, dist)
        valid_loss = float((vp - vy).abs().mean())
        if epoch == 1 or "first_valid" not in state:
            state["first_valid"] = valid_loss
        _check_valid_loss(valid_loss, state, vy, run_dir, seed, epoch)
        better = valid_loss <= state["best_valid"] - 1e-6
        if better:
            state["best_valid"], state["best_epoch"] = valid_loss, epoch
        state["history"].append({
            "epoch": epoch, "train_loss": round(total / max(n_seen, 1), 6),
            "valid_loss": round(valid_loss, 6), "train_s": round(train_time, 3),
            "train_samples_per_s": round(n_seen / max(train_time, 1e-9), 1), "best": better})
        if cfg.progress and main:
            tqdm.write(f"seed {seed} epoch {epoch}: train L1 {total / max(n_seen, 1):.4f}  "
                       f"valid L1 {valid_loss:.4f}{'  *' if better else ''}")
        stop = epoch - state["best_epoch"] >= cfg.patience or epoch == cfg.epochs
        stop = dist.broadcast_object(stop)  # equal on every rank; decided once all the same
        state["stop_reason"] = (None if not stop else "patience"
                                if epoch - state["best_epoch"] >= cfg.patience else "epochs")
        if run_dir:
            rng = rng_state()
            ranks = dist.all_gather_object(rng) if dist.active else None
            if main:
                if better:
                    state.setdefault("checksums", {})["best.safetensors"] = ckpt.save_weights(
                        os.path.join(run_dir, "best.safetensors"), model)
                extra = {"rng_ranks": ranks} if ranks else {}
                kept = {k: v for k, v in state.items() if k != "best_weights"}
                ckpt.save_checkpoint(run_dir, epoch, model, optimizer,
                                     dict(kept, **meta, **extra, rng=rng, finished=stop))
            state["epoch"] = epoch  # the last checkpoint on disk
            if kill_after == epoch:  # a crash at a known point (crash tests)
                if dist.active:
                    dist.broadcast_object(None)  # every rank waits for rank 0's checkpoint
                os.kill(os.getpid(), signal.SIGKILL)
        if better and (not run_dir or dist.active):  # DDP: no rank waits for rank 0's file
            state["best_weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if cfg.stop_after_epoch is not None and epoch >= cfg.stop_after_epoch and not stop:
            return {"seed": seed, "interrupted": True, "epoch": epoch, "history": state["history"]}

    if "best_weights" in state:
        model.load_state_dict(state.pop("best_weights"))
    elif run_dir and os.path.exists(os.path.join(run_dir, "best.safetensors")):
        dist.barrier()
        ckpt.load_weights(os.path.join(run_dir, "best.safetensors"), model)
    result = {
        "seed": seed,
        "best_epoch": state["best_epoch"],
        "best_valid_loss": round(state["best_valid"], 6),
        "epochs_run": len(state["history"]),
        "valid": evaluate(model, data, "valid", cfg, device, seed),
        "test": evaluate(model, data, "test", cfg, device, seed),
        "history": state["history"],
        "train_samples_per_s": round(
            sum(h["train_samples_per_s"] for h in state["history"]) / max(len(state["history"]), 1), 1),
    }
    result["model_obj"] = model
    return result

"""Batches of an :class:`~msa_fast.data.mmsa.SplitData`: padded tensors + padding masks.

A batch is a dict:

- ``text (B, Lt, 768)`` float or ``text_bert (B, 3, Lt)`` int64 (ids, mask, segments);
- ``audio (B, La, da)``, ``vision (B, Lv, dv)`` float32;
- ``text_mask``, ``audio_mask``, ``vision_mask`` ``(B, L)`` bool, **True = padding**
  (PyTorch's ``key_padding_mask`` convention), and ``*_lengths (B,)`` int64;
- ``labels (B,)`` float32, ``index (B,)`` int64 (rows of the split),
  ``present (B, 3)`` bool (modality present; the drop protocol clears it).

Each batch is cut to its longest sequence per modality, so that unaligned batches built
by :class:`BucketBatchSampler` (similar lengths together) carry little padding. The
dataset gathers a whole batch at once (``__getitems__``), one indexing per tensor.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from msa_fast.data.mmsa import SplitData


def _mask(lengths: torch.Tensor, L: int) -> torch.Tensor:
    return torch.arange(L)[None, :] >= lengths[:, None]


def gather_batch(split: SplitData, index: torch.Tensor) -> dict:
    t_len, a_len, v_len = split.text_lengths[index], split.audio_lengths[index], split.vision_lengths[index]
    Lt, La, Lv = int(t_len.max()), int(a_len.max()), int(v_len.max())
    batch = {
        "audio": split.audio[index, :La], "vision": split.vision[index, :Lv],
        "text_lengths": t_len, "audio_lengths": a_len, "vision_lengths": v_len,
        "text_mask": _mask(t_len, Lt), "audio_mask": _mask(a_len, La), "vision_mask": _mask(v_len, Lv),
        "labels": split.labels[index], "index": index,
        "present": torch.ones(len(index), 3, dtype=torch.bool),
    }
    if split.text is not None:
        batch["text"] = split.text[index, :Lt]
    if split.text_bert is not None:
        batch["text_bert"] = split.text_bert[index, :, :Lt]
    return batch


class SplitDataset(Dataset):
    def __init__(self, split: SplitData):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        return gather_batch(self.split, torch.tensor([i]))

    def __getitems__(self, indices: list[int]) -> dict:
        return gather_batch(self.split, torch.as_tensor(indices, dtype=torch.long))


def _identity(batch):
    return batch


class BucketBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar length: shuffle, cut into pools of ``pool`` batches,
    sort each pool by length, split into batches, shuffle the batches. ``set_epoch(e)``
    reseeds from ``(seed, e)`` so a resumed run sees the same order."""

    def __init__(self, lengths: torch.Tensor, batch_size: int, seed: int = 0, shuffle: bool = True,
                 pool: int = 50, drop_last: bool = False):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.shuffle, self.pool, self.drop_last, self.epoch = shuffle, pool, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        batches = []
        step = self.batch_size * self.pool
        for s in range(0, n, step):
            chunk = order[s : s + step]
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class EpochBatchSampler(Sampler[list[int]]):
    """Plain shuffled (or ordered) batches, reseeded from ``(seed, epoch)`` like the bucketed one."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.shuffle, self.epoch = n, batch_size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        return iter([order[i : i + self.batch_size].tolist() for i in range(0, self.n, self.batch_size)])

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


class EpochLoader:
    """Batches of one split for one epoch at a time: ``set_epoch(e)`` reseeds the sampler and
    the missing-modality protocol (``MissingProtocol.generator(seed, name, e)``), which is
    applied here, in the main process and in batch order, whatever ``num_workers`` is; so a
    resumed or data-parallel run (every rank iterates the same global batches) draws the same
    masks. Evaluation loaders stay at epoch 0: the same masks every time."""

    def __init__(self, loader: DataLoader, protocol=None, seed: int = 0, name: str = "train"):
        self.loader, self.protocol, self.seed, self.name, self.epoch = loader, protocol, seed, name, 0

    @property
    def batch_sampler(self):
        return self.loader.batch_sampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.protocol is None or not self.protocol.active:
            yield from self.loader
            return
        gen = self.protocol.generator(self.seed, self.name, self.epoch)
        for batch in self.loader:
            yield self.protocol(batch, gen)


def make_loader(split: SplitData, batch_size: int = 32, shuffle: bool = False, seed: int = 0,
                bucket: bool | None = None, aligned: bool = True, num_workers: int = 0,
                protocol=None, name: str = "train") -> EpochLoader:
    """An :class:`EpochLoader` of batch dicts. ``bucket`` defaults to ``not aligned`` (length
    bucketing for unaligned data). ``protocol`` (a :class:`~msa_fast.data.missing.MissingProtocol`)
    is applied to every batch with the generator of ``(seed, name, epoch)``."""
    if bucket is None:
        bucket = not aligned
    if bucket:
        lengths = torch.maximum(split.audio_lengths, split.vision_lengths)
        sampler = BucketBatchSampler(lengths, batch_size, seed=seed, shuffle=shuffle)
    else:
        sampler = EpochBatchSampler(len(split), batch_size, seed=seed, shuffle=shuffle)
    loader = DataLoader(SplitDataset(split), batch_sampler=sampler, collate_fn=_identity,
                        num_workers=num_workers)
    return EpochLoader(loader, protocol, seed, name)

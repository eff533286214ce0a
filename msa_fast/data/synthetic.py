"""Synthetic MOSI/MOSEI-shaped data in the exact MMSA pickle schema, with a planted signal.

Generative model, per sample (``z`` are latent sentiment contents, one per modality):

- ``z_t, z_a, z_v ~ N(0, 1)`` independent; noise levels ``r_m = exp(U(log 0.5, log 2))``
  (stored as ``noise_level (N, 3)``, t/a/v order) scale every modality's feature noise.
- label ``y = 3 tanh(0.9 h + e)``, ``h = sqrt(.45) z_t + sqrt(.30) g(z_a) + sqrt(.25) g(z_v)``,
  ``g(z) = (z + 0.5 sign(z) z^2) / 1.5`` (monotone, nonlinear), ``e ~ N(0, 0.3^2)``; ``y``
  rounded to MMSA's label grid (0.2 for MOSI, 1/3 for MOSEI) so that exact zeros occur.
  The per-modality shares of the variance of ``h`` are :data:`SHARES`; a text-only
  predictor's best Non0 accuracy is about 0.72, a full one about 0.9.
- text: ``text[l] = E[id_l] + (z_t + 0.5 eps_l) u_t + r_t n_l`` on valid tokens (CLS, words,
  SEP), 0 on padding; ``E`` a fixed random token table (scale 0.5), ``u_t`` a fixed unit
  vector in R^768, ``n_l ~ N(0, I)``. ``text_bert`` holds ids (CLS 101, SEP 102, pad 0; a
  word is a sentiment word with p=0.2, positive with p=sigmoid(2.5 z_t)), mask, segments,
  stored as float like MMSA.
- audio / vision frames: ``x[f] = g(z_m)(1 + 0.3 eps_f) u_m + r_m n_f`` with ``u_m`` a fixed
  unit vector; aligned data has a frame per text position; unaligned data has
  ``U[0.4 L, L]`` frames (L = 375/500 for MOSI, 500/500 for MOSEI). A COVAREP-like 0.2 % of
  valid audio frames hold ``-inf`` in channel 0 (the loader cleans them).
- ``latent (N, 3)`` holds ``(z_t, z_a, z_v)``.

Determinism: the fixed tables come from ``default_rng([seed, 7])``; samples are drawn in
chunks of 256 from ``default_rng([seed, split, chunk])``, so a ``limit`` yields a prefix of
the full set. Large sets are built in ``.npy`` memmaps and pickled (protocol 5) straight
from them, so memory stays bounded while writing.
"""

from __future__ import annotations

import os
import pickle
import tempfile

import numpy as np

from msa_fast.data.schema import PRESET_DIMS, SPLITS, check_pickle

VERSION = 1
SHARES = {"text": 0.45, "audio": 0.30, "vision": 0.25}
LABEL_NOISE = 0.3
SEQ_LEN = 50
CHUNK = 256
VOCAB = 8192

PRESETS = {
    "mosi": dict(PRESET_DIMS["mosi"], sizes=(1284, 229, 686), label_step=0.2),
    "mosei": dict(PRESET_DIMS["mosei"], sizes=(16326, 1871, 4659), label_step=1 / 3),
    # MOSI widths, a few hundred samples: for tests and smoke runs.
    "tiny": dict(PRESET_DIMS["mosi"], sizes=(192, 64, 64), label_step=0.2),
}


def _g(z: np.ndarray) -> np.ndarray:
    return (z + 0.5 * np.sign(z) * z * z) / 1.5


def _unit(rng, d: int) -> np.ndarray:
    u = rng.standard_normal(d).astype(np.float32)
    return u / np.linalg.norm(u)


class _Tables:
    def __init__(self, seed: int, p: dict):
        rng = np.random.default_rng([seed, 7])
        self.emb = (0.5 * rng.standard_normal((VOCAB, p["text"]), dtype=np.float32))
        self.u = {"text": _unit(rng, p["text"]), "audio": _unit(rng, p["audio"]),
                  "vision": _unit(rng, p["vision"])}


def token_ids(rng, senti, positive, valid, t_len):
    """BERT-style token ids ``(n, L)`` and the ``text_bert`` array ``(n, 3, L)`` (ids, mask,
    segments; float32 as MMSA stores them): a sentiment word where ``senti`` (ids 1000-1049
    if ``positive``, else 1050-1099), another word elsewhere (2000..VOCAB-1), ``[CLS]`` (101)
    first, ``[SEP]`` (102) at ``t_len - 1``, padding 0 past the text. The three word draws
    are made in this order over the full ``(n, L)`` grid (the generators' streams rely on it)."""
    shape = senti.shape
    ids = np.where(senti, np.where(positive, rng.integers(1000, 1050, shape),
                                   rng.integers(1050, 1100, shape)),
                   rng.integers(2000, VOCAB, shape))
    ids[:, 0] = 101
    ids[np.arange(shape[0]), t_len - 1] = 102
    ids[~valid] = 0
    return ids, np.stack([ids, valid, np.zeros_like(ids)], axis=1).astype(np.float32)

def _chunk(rng, n: int, p: dict, tab: _Tables, aligned: bool) -> dict:
    f32 = np.float32
    z = rng.standard_normal((n, 3))
    r = np.exp(rng.uniform(np.log(0.5), np.log(2.0), (n, 3)))
    h = (np.sqrt(SHARES["text"]) * z[:, 0] + np.sqrt(SHARES["audio"]) * _g(z[:, 1])
         + np.sqrt(SHARES["vision"]) * _g(z[:, 2]))
    y = 3.0 * np.tanh(0.9 * h + LABEL_NOISE * rng.standard_normal(n))
    step = p["label_step"]
    y = np.clip(np.round(y / step) * step, -3.0, 3.0)

    # text_bert: CLS w_1..w_k SEP pad...
    words = rng.integers(8, SEQ_LEN - 1, n)  # 8..48 words -> length 10..50
    t_len = words + 2
    pos = np.arange(SEQ_LEN)[None, :]
    valid = pos < t_len[:, None]
    senti = rng.random((n, SEQ_LEN)) < 0.2
    positive = rng.random((n, SEQ_LEN)) < 1.0 / (1.0 + np.exp(-2.5 * z[:, :1]))
    ids, text_bert = token_ids(rng, senti, positive, valid, t_len)

    amp_t = (z[:, :1] + 0.5 * rng.standard_normal((n, SEQ_LEN))).astype(f32)  # (n, L)
    text = tab.emb[ids]  # (n, L, 768), a fresh array
    text += amp_t[:, :, None] * tab.u["text"]
    text += (r[:, 0, None, None].astype(f32)
             * rng.standard_normal(text.shape, dtype=f32))
    text[~valid] = 0.0

    out = {"text": text, "text_bert": text_bert, "regression_labels": y.astype(f32),
           "noise_level": r.astype(f32), "latent": z.astype(f32)}
    for mi, m in ((1, "audio"), (2, "vision")):
        if aligned:
            L, lengths = SEQ_LEN, t_len
        else:
            L = p[f"{m}_len"]
            lengths = rng.integers(int(0.4 * L), L + 1, n)
        d = p[m]
        amp = (_g(z[:, mi])[:, None] * (1 + 0.3 * rng.standard_normal((n, L)))).astype(f32)
        x = amp[:, :, None] * tab.u[m] + r[:, mi, None, None].astype(f32) * rng.standard_normal(
            (n, L, d), dtype=f32)
        fvalid = np.arange(L)[None, :] < lengths[:, None]
        x[~fvalid] = 0.0
        if m == "audio":
            x[..., 0][fvalid & (rng.random((n, L)) < 0.002)] = -np.inf
        out[m] = x
        if not aligned:
            out[f"{m}_lengths"] = lengths.astype(np.int64)
    return out


def build_splits(preset: str, seed: int, limit: int | None, workdir: str | None,
                 make_chunk) -> dict:
    """``{train, valid, test}`` from ``make_chunk(rng, CHUNK, split_index) -> dict of arrays``,
    chunk ``ci`` of split ``si`` drawn from ``default_rng([seed, si, ci])`` (shared by the
    generators, so a ``limit`` always yields a prefix). 3-d arrays go to ``.npy`` memmaps
    under ``workdir`` when it is given."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit: expected a positive integer (samples per split), got {limit}")
    p = PRESETS[preset]
    pkl = {}
    for si, split in enumerate(SPLITS):
        n = p["sizes"][si] if limit is None else min(limit, p["sizes"][si])
        arrays: dict[str, np.ndarray] = {}
        for ci, start in enumerate(range(0, n, CHUNK)):
            rng = np.random.default_rng([seed, si, ci])
            part = make_chunk(rng, CHUNK, si)
            stop = min(start + CHUNK, n)
            for k, v in part.items():
                if k not in arrays:
                    shape = (n, *v.shape[1:])
                    if workdir is not None and v.ndim == 3:
                        arrays[k] = np.lib.format.open_memmap(
                            os.path.join(workdir, f"{split}_{k}.npy"), "w+", v.dtype, shape)
                    else:
                        arrays[k] = np.empty(shape, v.dtype)
                arrays[k][start:stop] = v[: stop - start]
        d = {k: np.asarray(v) for k, v in arrays.items()}  # plain ndarray views pickle zero-copy
        d["id"] = np.array([f"{preset}_{split}_{i:05d}" for i in range(n)], dtype=object)
        d["raw_text"] = np.array(["synthetic"] * n, dtype=object)
        pkl[split] = d
    return pkl


def generate(preset: str = "mosi", seed: int = 0, aligned: bool = True,
             limit: int | None = None, workdir: str | None = None) -> dict:
    """The pickle dict ``{train, valid, test, synthetic}``. Arrays live in memmaps under
    ``workdir`` when given (pickle them before deleting it), else in memory."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    tab = _Tables(seed, p)
    pkl = build_splits(preset, seed, limit, workdir,
                       lambda rng, n, si: _chunk(rng, n, p, tab, aligned))
    pkl["synthetic"] = {"preset": preset, "seed": seed, "aligned": aligned, "shares": SHARES,
                        "label_noise": LABEL_NOISE, "version": VERSION}
    return pkl


def write_pickle(path: str, big: bool, make_pkl) -> str:
    """Pickle ``make_pkl(workdir_or_None)`` to ``path`` atomically (temp file + ``os.replace``),
    after :func:`check_pickle`; ``big`` builds the arrays in memmaps next to ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as work:
        pkl = make_pkl(work if big else None)
        check_pickle(pkl)  # never leave a file in place that the loader would reject
        tmp = os.path.join(work, "out.pkl")
        with open(tmp, "wb") as f:
            pickle.dump(pkl, f, protocol=5)
        del pkl
        os.replace(tmp, path)
    return path


def write(path: str, preset: str = "mosi", seed: int = 0, aligned: bool = True,
          limit: int | None = None) -> str:
    """Generate and pickle to ``path`` atomically (temp file + ``os.replace``)."""
    big = PRESETS[preset]["sizes"][0] > 4000 and limit is None
    return write_pickle(path, big, lambda work: generate(preset, seed, aligned, limit, workdir=work))


def cache_dir() -> str:
    return os.environ.get("MSA_FAST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "msa_fast")


def cached_pickle(stem: str, version: str, preset: str, seed: int, aligned: bool,
                  limit: int | None, write_fn) -> str:
    """Path of the cached pickle ``<stem>_<preset>_<aligned|unaligned>_seed<seed>_<all|n<limit>>
    _<version>.pkl`` under :func:`cache_dir`, written once by ``write_fn(path)``; shared by the
    v1 data (``synthetic``, ``v<VERSION>``) and the PID data (``synthetic_pid``, ``pidv<N>``)."""
    name = (f"{stem}_{preset}_{'aligned' if aligned else 'unaligned'}_seed{seed}"
            f"_{'all' if limit is None else f'n{limit}'}_{version}.pkl")
    path = os.path.join(cache_dir(), "synthetic", name)
    if not os.path.exists(path):
        write_fn(path)
    return path


def cached(preset: str = "mosi", seed: int = 0, aligned: bool = True,
           limit: int | None = None) -> str:
    """Path of the cached pickle for (preset, seed, alignment, limit), generating it once."""
    return cached_pickle("synthetic", f"v{VERSION}", preset, seed, aligned, limit,
                         lambda path: write(path, preset, seed, aligned, limit))

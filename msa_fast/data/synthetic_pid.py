"""``synthetic:<preset>:pid``: MMSA-schema data whose label depends on the modalities through
redundant, unique and synergistic latents (after Liang et al.'s partial information
decomposition datasets), with cues localised in time and per-sample corruption.

Generative model, per sample (all latents ``~ N(0, 1)`` independent):

- latents, stored as ``latent (N, 6)`` in this column order (:data:`LATENTS`):
  ``rho`` (redundant, in every modality), ``u_t``, ``u_a``, ``u_v`` (unique to text /
  audio / vision), ``s_a``, ``s_v`` (the synergistic pair: ``s_a`` only in audio, ``s_v``
  only in vision).
- label ``y = 3 tanh(0.9 h + e)``, ``e ~ N(0, 0.3^2)``, rounded to MMSA's grid (0.2 MOSI,
  1/3 MOSEI), with ``h = sqrt(w_r) rho + sqrt(w_t) u_t + sqrt(w_a) u_a + sqrt(w_v) u_v
  + sqrt(w_s) s_a s_v``. ``s_a s_v`` has unit variance, so the weights ``w`` (:data:`SHARES`,
  defaults redundant 0.30, unique text 0.20 / audio 0.15 / vision 0.15, synergy 0.20) are
  the shares of ``var(h)``. ``E[s_a s_v | s_a] = 0``: the synergy term is invisible from
  audio alone and from vision alone, and only their product carries signal.
- time localisation: each modality's cue lives in a window of ``U(0.2, 0.5)`` of its valid
  frames/tokens (at least one) at a uniform random position, stored as ``window (N, 3, 2)``
  int64 ``(start, length)`` in t/a/v order; aligned data shares one window across the
  modalities (a frame per token), unaligned data draws one per modality, so they are offset.
- features of modality ``m`` at frame ``f``: ``x[f] = 1[f in window] (1 + 0.3 eps_f) G c_m D_m
  + sigma_m n_f``, ``n_f ~ N(0, I)``, ``G = 3``, ``c_m`` the modality's latents (text
  ``(rho, u_t)``, audio ``(rho, u_a, s_a)``, vision ``(rho, u_v, s_v)``), ``D_m`` fixed
  orthonormal directions; text adds the token embedding ``E[id_l]`` (scale 0.5) as in v1, and
  inside the window a word is a sentiment word with p=0.3, positive with p=sigmoid(2.5 c),
  ``c = (sqrt(w_r) rho + sqrt(w_t) u_t) / sqrt(w_r + w_t)``. Padding is 0. Noise levels
  ``sigma_m = exp(U(log 0.5, log 1.5))`` are stored as ``noise_level (N, 3)``.
- corruption: with probability 0.3 a sample gets one modality (uniform) corrupted, recorded
  in ``corrupted (N, 3)`` bool (at most one True per row): that modality's cue is removed
  (``c_m = 0``, no sentiment words) and its noise multiplied by 3 (``noise_level`` includes it).
  The label still depends on the hidden latents, so only the other modalities can stand in.
- unaligned lengths as v1 (``U[0.4 L, L]`` frames); 0.2 % of valid audio frames hold ``-inf``
  in channel 0 like COVAREP (the loader cleans them).

Ceilings: the best predictor that knows every latent a modality set exposes (median of ``y``
over the hidden ones; a corrupted modality exposes nothing) -- an upper bound for any model,
which must also find the windows and beat the noise. ``python -m msa_fast.data.synthetic_pid
--ceilings`` (200 000 samples, MOSI grid, default shares) gives, Non0_acc_2 / MAE:

==================  ==========  =====
modalities          Non0_acc_2  MAE
==================  ==========  =====
all                 0.8738      0.5882
text only           0.7168      1.1608
drop text           0.8046      0.8635
drop audio          0.7794      0.9730
drop vision         0.7785      0.9727
==================  ==========  =====

Determinism and caching as v1 (:func:`msa_fast.data.synthetic.build_splits`): fixed tables
from ``default_rng([seed, 7, 15])``, chunks of 256 from ``default_rng([seed, split, chunk])``,
so ``limit`` gives a prefix; cached under the v1 cache directory as
``synthetic_pid_<preset>_<aligned|unaligned>_seed<S>_<all|nN>_pidv<VERSION>.pkl``.
"""

from __future__ import annotations

import argparse

import numpy as np

from msa_fast.data.synthetic import (
    PRESETS,
    SEQ_LEN,
    VOCAB,
    build_splits,
    cached_pickle,
    token_ids,
    write_pickle,
)

VERSION = 1
LATENTS = ("redundant", "unique_text", "unique_audio", "unique_vision",
           "synergy_audio", "synergy_vision")
SHARES = {"redundant": 0.30, "unique_text": 0.20, "unique_audio": 0.15, "unique_vision": 0.15,
          "synergy": 0.20}
CORRUPT_RATE = 0.3
CORRUPT_NOISE = 3.0
WINDOW = (0.2, 0.5)
GAIN = 3.0
LABEL_NOISE = 0.3
NOISE_RANGE = (0.5, 1.5)
# latent columns carried by each modality (t/a/v order)
MODALITY_LATENTS = ((0, 1), (0, 2, 4), (0, 3, 5))


def _check_shares(shares: dict) -> dict:
    if set(shares) != set(SHARES):
        raise ValueError(f"shares: expected keys {sorted(SHARES)}, got {sorted(shares)}")
    if any(not np.isfinite(v) or v < 0 for v in shares.values()):
        raise ValueError(f"shares: expected non-negative numbers, got {shares}")
    return {k: float(v) for k, v in shares.items()}


def _h(lat: np.ndarray, w: dict) -> np.ndarray:
    return (np.sqrt(w["redundant"]) * lat[..., 0] + np.sqrt(w["unique_text"]) * lat[..., 1]
            + np.sqrt(w["unique_audio"]) * lat[..., 2] + np.sqrt(w["unique_vision"]) * lat[..., 3]
            + np.sqrt(w["synergy"]) * lat[..., 4] * lat[..., 5])


def _label(h: np.ndarray, e: np.ndarray, step: float) -> np.ndarray:
    y = 3.0 * np.tanh(0.9 * h + LABEL_NOISE * e)
    return np.clip(np.round(y / step) * step, -3.0, 3.0)


def _orthonormal(rng, d: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q.T.astype(np.float32)  # (k, d), rows orthonormal


class _Tables:
    def __init__(self, seed: int, p: dict):
        rng = np.random.default_rng([seed, 7, 15])
        self.emb = 0.5 * rng.standard_normal((VOCAB, p["text"]), dtype=np.float32)
        self.dirs = [_orthonormal(rng, p[m], len(cols))
                     for m, cols in zip(("text", "audio", "vision"), MODALITY_LATENTS)]


def _window(rng, lengths: np.ndarray) -> np.ndarray:
    frac = rng.uniform(*WINDOW, lengths.shape[0])
    wlen = np.clip(np.round(frac * lengths).astype(np.int64), 1, lengths)
    start = (rng.random(lengths.shape[0]) * (lengths - wlen + 1)).astype(np.int64)
    return np.stack([start, wlen], axis=1)


def _chunk(rng, n: int, p: dict, tab: _Tables, aligned: bool, w: dict) -> dict:
    f32 = np.float32
    lat = rng.standard_normal((n, 6))
    y = _label(_h(lat, w), rng.standard_normal(n), p["label_step"])
    sigma = np.exp(rng.uniform(np.log(NOISE_RANGE[0]), np.log(NOISE_RANGE[1]), (n, 3)))
    hit = rng.random(n) < CORRUPT_RATE
    which = rng.integers(0, 3, n)
    corrupted = np.zeros((n, 3), dtype=bool)
    corrupted[np.flatnonzero(hit), which[hit]] = True
    sigma = np.where(corrupted, sigma * CORRUPT_NOISE, sigma)

    words = rng.integers(8, SEQ_LEN - 1, n)  # 8..48 words -> length 10..50
    t_len = words + 2
    lengths = [t_len]
    for m in ("audio", "vision"):
        lengths.append(t_len if aligned else rng.integers(int(0.4 * p[f"{m}_len"]),
                                                          p[f"{m}_len"] + 1, n))
    if aligned:
        win = np.repeat(_window(rng, t_len)[:, None, :], 3, axis=1)
    else:
        win = np.stack([_window(rng, lengths[mi]) for mi in range(3)], axis=1)

    out = {"regression_labels": y.astype(f32), "noise_level": sigma.astype(f32),
           "latent": lat.astype(f32), "corrupted": corrupted, "window": win}
    for mi, m in enumerate(("text", "audio", "vision")):
        L = SEQ_LEN if (aligned or m == "text") else p[f"{m}_len"]
        pos = np.arange(L)[None, :]
        valid = pos < lengths[mi][:, None]
        inside = (pos >= win[:, mi, :1]) & (pos < win[:, mi, :1] + win[:, mi, 1:])
        coef = GAIN * lat[:, MODALITY_LATENTS[mi]] * ~corrupted[:, mi, None]
        amp = (inside * (1 + 0.3 * rng.standard_normal((n, L)))).astype(f32)
        x = amp[:, :, None] * (coef.astype(f32) @ tab.dirs[mi])[:, None, :]
        x += sigma[:, mi, None, None].astype(f32) * rng.standard_normal(x.shape, dtype=f32)
        if m == "text":
            c = ((np.sqrt(w["redundant"]) * lat[:, 0] + np.sqrt(w["unique_text"]) * lat[:, 1])
                 / max(np.sqrt(w["redundant"] + w["unique_text"]), 1e-12))
            senti = inside & (rng.random((n, L)) < 0.3) & ~corrupted[:, :1]
            positive = rng.random((n, L)) < 1.0 / (1.0 + np.exp(-2.5 * c[:, None]))
            ids, out["text_bert"] = token_ids(rng, senti, positive, valid, t_len)
            x += tab.emb[ids]
        x[~valid] = 0.0
        if m == "audio":
            x[..., 0][valid & (rng.random((n, L)) < 0.002)] = -np.inf
        out[m] = x
        if not aligned and m != "text":
            out[f"{m}_lengths"] = lengths[mi].astype(np.int64)
    return out


def meta(preset: str, seed: int, aligned: bool, shares: dict | None = None) -> dict:
    """The ``pkl["synthetic"]`` entry (numbers and strings only, for the safe unpickler)."""
    return {"preset": preset, "seed": seed, "aligned": aligned, "kind": "pid",
            "version": VERSION, "shares": _check_shares(shares or SHARES),
            "latents": list(LATENTS), "corrupt_rate": CORRUPT_RATE,
            "corrupt_noise": CORRUPT_NOISE, "window": list(WINDOW), "gain": GAIN,
            "label_noise": LABEL_NOISE}


def generate(preset: str = "mosi", seed: int = 0, aligned: bool = True,
             limit: int | None = None, workdir: str | None = None,
             shares: dict | None = None) -> dict:
    """The pickle dict ``{train, valid, test, synthetic}`` (see the module doc).
    ``shares`` overrides :data:`SHARES` (same keys)."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    w = _check_shares(shares or SHARES)
    p = PRESETS[preset]
    tab = _Tables(seed, p)
    pkl = build_splits(preset, seed, limit, workdir,
                       lambda rng, n, si: _chunk(rng, n, p, tab, aligned, w))
    pkl["synthetic"] = meta(preset, seed, aligned, w)
    return pkl


def write(path: str, preset: str = "mosi", seed: int = 0, aligned: bool = True,
          limit: int | None = None) -> str:
    """Generate with the default shares and pickle to ``path`` atomically."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    big = PRESETS[preset]["sizes"][0] > 4000 and limit is None
    return write_pickle(path, big, lambda work: generate(preset, seed, aligned, limit, work))


def cached(preset: str = "mosi", seed: int = 0, aligned: bool = True,
           limit: int | None = None) -> str:
    """Path of the cached pickle (default shares), generating it once."""
    return cached_pickle("synthetic_pid", f"pidv{VERSION}", preset, seed, aligned, limit,
                         lambda path: write(path, preset, seed, aligned, limit))


SCENARIOS = {"all": (1, 1, 1), "text only": (1, 0, 0), "audio only": (0, 1, 0),
             "vision only": (0, 0, 1), "drop text": (0, 1, 1), "drop audio": (1, 0, 1),
             "drop vision": (1, 1, 0)}


def ceilings(n: int = 200_000, draws: int = 64, seed: int = 0, label_step: float = 0.2,
             shares: dict | None = None) -> dict:
    """Best-achievable test metrics per modality set (:data:`SCENARIOS`), by sampling.

    The predictor sees every latent carried by an available, uncorrupted modality (the
    redundant one if any such modality is left, ``s_a s_v`` only with both audio and vision)
    and predicts the median of ``y`` over ``draws`` samples of the hidden latents and label
    noise (the MAE-optimal choice). Returns ``{scenario: mosi_regression_metrics}``."""
    from msa_fast.metrics import mosi_regression_metrics

    w = _check_shares(shares or SHARES)
    rng = np.random.default_rng([seed, 15])
    lat = rng.standard_normal((n, 6))
    y = _label(_h(lat, w), rng.standard_normal(n), label_step)
    hit = rng.random(n) < CORRUPT_RATE
    corrupted = np.zeros((n, 3), dtype=bool)
    corrupted[np.flatnonzero(hit), rng.integers(0, 3, n)[hit]] = True
    out = {}
    for name, avail in SCENARIOS.items():
        ok = np.asarray(avail, dtype=bool)[None, :] & ~corrupted  # (n, 3)
        seen = np.stack([ok.any(1), ok[:, 0], ok[:, 1], ok[:, 2], ok[:, 1], ok[:, 2]], axis=1)
        pred = np.empty(n)
        for s in range(0, n, 20_000):
            lt, sn = lat[s:s + 20_000], seen[s:s + 20_000]
            fill = rng.standard_normal((draws, *lt.shape))
            sample = np.where(sn[None], lt[None], fill)
            ys = _label(_h(sample, w), rng.standard_normal((draws, lt.shape[0])), label_step)
            pred[s:s + 20_000] = np.median(ys, axis=0)
        out[name] = mosi_regression_metrics(pred.astype(np.float32), y.astype(np.float32))
    return out


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m msa_fast.data.synthetic_pid")
    ap.add_argument("--ceilings", action="store_true", help="estimate the ceilings by sampling")
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--draws", type=int, default=64)
    args = ap.parse_args(argv)
    if not args.ceilings:
        ap.print_help()
        return 0
    res = ceilings(args.n, args.draws)
    print(f"{'modalities':<14} Non0_acc_2  MAE     Corr")
    for name, m in res.items():
        print(f"{name:<14} {m['Non0_acc_2']:.4f}      {m['MAE']:.4f}  {m['Corr']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

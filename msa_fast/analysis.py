"""Feature analyses of a trained model (contract §11): ``gates``, ``tsne``, ``location-error``.

Each writes ``OUT/<what>.json`` and ``OUT/<what>.png`` (matplotlib, Agg) for one split
(``test`` by default) of a seed's run directory, the model in eval mode:

- ``gates`` (AGFN, any model whose ``model.fusion.last_weights`` holds the dual gate's
  ``(e, g[, H])``, each ``(B, M)``): per modality ``m`` the mean entropy-gate weight
  ``e_m`` and importance gate ``g_m``
  * on the clean split;
  * on the samples where ``m`` is corrupted (``split.extra["corrupted"] (N, 3)`` bool, the
    PID synthetic data) against the samples with no corrupted modality -- skipped, and said
    in the JSON, when the data has no ``corrupted``;
  * under Gaussian noise of :data:`NOISE_LEVEL` = 1 feature std on ``m`` alone
    (:mod:`msa_fast.robustness`'s protocol, seed 0) against the same samples clean.
- ``tsne`` (FD-CMDIE, any model with ``_vectors(batch) -> (sim (B, 3, d), diff (B, 3, d))``):
  the pooled similarity and dissimilarity features of at most ``limit`` (500) samples, six
  points per sample (sim / diff x t, a, v), embedded by scikit-learn's ``TSNE`` (2-D, PCA
  init, ``random_state=0``, perplexity ``min(30, (n - 1) / 3)``), coloured by feature
  (modality x kind) and by the 3-class sentiment (negative / neutral / positive,
  ``sentiment_classes(y, "3")``). The JSON has the silhouette scores (sklearn, Euclidean) of
  the embedding and of the original features by feature group, by kind (sim / diff) and by
  class, and the coordinates.
- ``location-error`` (AGFN, any model with a ``fusion`` sub-module whose output is the fused
  vector ``(B, d)``, captured with a forward hook): the centroid ``c`` of the fused vectors
  of the clean *train* split; per sample of the split, ``dist = ||f - c||_2`` and the
  absolute error ``|pred - y|``; Pearson's r (``np.corrcoef``) and Spearman's rho (Pearson
  on ranks, ties averaged by ``scipy.stats.rankdata`` when scipy is there, else ordinal).

A model that lacks what ``what`` needs raises ``ValueError`` naming the model and the missing
attribute (one line from the CLI).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from msa_fast import _io
from msa_fast.robustness import _need, feature_std, load_run

WHATS = ("gates", "tsne", "location-error")
NOISE_LEVEL = 1.0
_MODS = ("text", "audio", "vision")


def _loader(data, split, batch_size, protocol=None):
    from msa_fast.data.loader import make_loader

    return make_loader(data[split], batch_size, shuffle=False, seed=0, aligned=data.aligned,
                       protocol=protocol, name=split)


def _batches(model, loader, device):
    """Yield ``(batch, out)`` of every batch in eval mode without gradients."""
    from msa_fast.train.trainer import to_device

    device = torch.device(device)
    model.eval()
    with torch.no_grad():
        for batch in loader:
            batch = to_device(batch, device)
            yield batch, model(batch)


def _pyplot():
    _need("matplotlib")
    return _io.pyplot()


def _gate_weights(model, loader, device):
    """``(e, g, H, index)`` of every row in row order, ``(N, 3)`` each; ``H`` (the entropy of the
    gate's distribution) is None when the fusion reports only ``(e, g)``."""
    ws, idx = [], []
    for batch, _ in _batches(model, loader, device):
        ws.append([w.float().cpu() for w in model.fusion.last_weights])  # (e, g) or (e, g, H)
        idx.append(batch["index"].cpu())
    index = torch.cat(idx)
    order = torch.argsort(index)
    e, g, *h = (torch.cat(parts)[order] for parts in zip(*ws))
    return e, g, (h[0] if h else None), index[order]


def gates(model, data, split="test", batch_size=64, device="cpu", name="model") -> tuple[dict, object]:
    from msa_fast.data.missing import add_gaussian_noise
    from msa_fast.robustness import _Transform

    fusion = getattr(model, "fusion", None)
    if fusion is None or not hasattr(fusion, "last_weights"):
        raise ValueError(f"analyze --what gates: model {name!r} exposes no dual-gate weights "
                         f"(model.fusion.last_weights)")
    e, g, H, _ = _gate_weights(model, _loader(data, split, batch_size), device)
    res = {"clean": {"e": e.mean(0).tolist(), "g": g.mean(0).tolist(), "n": len(e)}}
    noise = {"level": NOISE_LEVEL, "seed": 0}
    for m, mod in enumerate(_MODS):
        if getattr(data["train"], mod) is None:
            noise[mod] = "not applicable (token ids only)"
            continue
        std = feature_std(data["train"], mod)
        tr = _Transform(lambda b, gen, mod=mod, std=std: add_gaussian_noise(b, mod, NOISE_LEVEL, std, gen), 0)
        en, gn, _, _ = _gate_weights(model, _loader(data, split, batch_size, tr), device)
        noise[mod] = {"e_clean": float(e[:, m].mean()), "e_noised": float(en[:, m].mean()),
                      "g_clean": float(g[:, m].mean()), "g_noised": float(gn[:, m].mean())}
    res["noise"] = noise
    corrupted = data[split].extra.get("corrupted")
    if corrupted is None:
        res["corrupted"] = {"skipped": f"the data has no split.extra['corrupted'] ({data.source})"}
    else:
        c = torch.as_tensor(corrupted).bool()
        clean = ~c.any(1)
        cor = {"n_clean": int(clean.sum())}
        for m, mod in enumerate(_MODS):
            rows = c[:, m]
            mean = lambda x, r: float(x[r].mean()) if bool(r.any()) else float("nan")  # noqa: E731
            cor[mod] = {"n_corrupted": int(rows.sum()), "e_clean": mean(e[:, m], clean),
                        "e_corrupted": mean(e[:, m], rows), "g_clean": mean(g[:, m], clean),
                        "g_corrupted": mean(g[:, m], rows)}
            if H is not None:
                cor[mod].update(H_clean=mean(H[:, m], clean), H_corrupted=mean(H[:, m], rows))
        res["corrupted"] = cor

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("e", "g")):
        bars = {"clean": [res["clean"][key][m] for m in range(3)]}
        bars["noised (own modality)"] = [noise[mod][f"{key}_noised"] if isinstance(noise[mod], dict)
                                         else np.nan for mod in _MODS]
        if "skipped" not in res["corrupted"]:
            bars["corrupted (own modality)"] = [res["corrupted"][mod][f"{key}_corrupted"] for mod in _MODS]
        w = 0.8 / len(bars)
        for i, (label, vals) in enumerate(bars.items()):
            ax.bar(np.arange(3) + i * w, vals, w, label=label)
        ax.set_xticks(np.arange(3) + w * (len(bars) - 1) / 2, _MODS)
        ax.set(title="entropy gate e" if key == "e" else "importance gate g", ylabel="mean weight")
        ax.legend(fontsize=7)
    return res, fig


def tsne(model, data, split="test", batch_size=64, device="cpu", name="model", limit=500) -> tuple[dict, object]:
    from msa_fast.ops import sentiment_classes

    if not callable(getattr(model, "_vectors", None)):
        raise ValueError(f"analyze --what tsne: model {name!r} exposes no decoupled "
                         f"similarity/dissimilarity features (model._vectors)")
    manifold = _need("sklearn.manifold")
    sk_metrics = _need("sklearn.metrics")
    split_data = data[split]
    n = min(len(split_data), limit or 500)
    if n < 4:
        raise ValueError(f"analyze --what tsne: needs at least 4 samples, split {split!r} has {n}")
    split_data = split_data.subset(torch.arange(n))
    from msa_fast.data.loader import make_loader
    from msa_fast.train.trainer import to_device

    sims, diffs, ys = [], [], []
    device = torch.device(device)
    model.eval()
    with torch.no_grad():
        for batch in make_loader(split_data, batch_size, shuffle=False, aligned=True, name=split):
            batch = to_device(batch, device)
            s, d = model._vectors(batch)
            sims.append(s.float().cpu())
            diffs.append(d.float().cpu())
            ys.append(batch["labels"].float().cpu())
    S, D, y = torch.cat(sims), torch.cat(diffs), torch.cat(ys)
    X = torch.cat([S[:, m] for m in range(3)] + [D[:, m] for m in range(3)]).numpy()  # (6n, d)
    groups = [f"{k} {mod}" for k in ("sim", "diff") for mod in _MODS]
    group = np.repeat(np.arange(6), n)
    kind = group // 3
    cls = np.tile(sentiment_classes(y, "3").numpy(), 6)
    perplexity = float(min(30.0, (len(X) - 1) / 3))
    Z = manifold.TSNE(n_components=2, init="pca", random_state=0, perplexity=perplexity).fit_transform(X)

    def sil(F, lab):
        return float(sk_metrics.silhouette_score(F, lab)) if 1 < len(set(lab.tolist())) < len(F) else None

    res = {"n_samples": n, "points": len(X), "perplexity": perplexity, "groups": groups,
           "classes": ["negative", "neutral", "positive"],
           "silhouette": {"embedding": {"group": sil(Z, group), "kind": sil(Z, kind), "class": sil(Z, cls)},
                          "features": {"group": sil(X, group), "kind": sil(X, kind), "class": sil(X, cls)}},
           "coordinates": np.round(Z, 4).tolist(), "group": group.tolist(), "class": cls.tolist()}
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for gi, gname in enumerate(groups):
        sel = group == gi
        axes[0].scatter(Z[sel, 0], Z[sel, 1], s=6, marker="o" if gi < 3 else "x", label=gname)
    axes[0].set_title("t-SNE by feature (sim o / diff x)")
    axes[0].legend(fontsize=7, markerscale=2)
    for ci, cname in enumerate(res["classes"]):
        sel = cls == ci
        axes[1].scatter(Z[sel, 0], Z[sel, 1], s=6, label=cname)
    axes[1].set_title("t-SNE by sentiment class")
    axes[1].legend(fontsize=7, markerscale=2)
    return res, fig


def _fused(model, loader, device):
    feats, preds, ys = [], [], []
    hook = model.fusion.register_forward_hook(lambda _m, _i, out: feats.append(out.detach().float().cpu()))
    try:
        for batch, out in _batches(model, loader, device):
            preds.append(out["pred"].float().cpu())
            ys.append(batch["labels"].float().cpu())
    finally:
        hook.remove()
    return torch.cat(feats), torch.cat(preds), torch.cat(ys)


def _ranks(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.stats import rankdata

        return rankdata(x)
    except ImportError:
        return np.argsort(np.argsort(x)).astype(np.float64)


def location_error(model, data, split="test", batch_size=64, device="cpu", name="model") -> tuple[dict, object]:
    if not isinstance(getattr(model, "fusion", None), torch.nn.Module):
        raise ValueError(f"analyze --what location-error: model {name!r} has no fusion module "
                         f"(model.fusion) whose output is the fused feature")
    ftr, _, _ = _fused(model, _loader(data, "train", batch_size), device)
    if ftr.dim() != 2:
        raise ValueError(f"analyze --what location-error: model {name!r}'s fusion output has shape "
                         f"{tuple(ftr.shape)}, expected (B, d)")
    centroid = ftr.mean(0)
    f, p, y = _fused(model, _loader(data, split, batch_size), device)
    dist = (f - centroid).norm(dim=1).numpy().astype(np.float64)
    err = (p - y).abs().numpy().astype(np.float64)
    pearson = float(np.corrcoef(dist, err)[0, 1]) if len(dist) > 1 else float("nan")
    spearman = float(np.corrcoef(_ranks(dist), _ranks(err))[0, 1]) if len(dist) > 1 else float("nan")
    res = {"n": len(dist), "pearson_r": pearson, "spearman_rho": spearman,
           "centroid_from": "train split, clean", "mean_distance": float(dist.mean()),
           "mean_abs_error": float(err.mean()), "distance": np.round(dist, 5).tolist(),
           "abs_error": np.round(err, 5).tolist()}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(dist, err, s=6)
    ax.set(xlabel="distance from the train centroid (fused features)", ylabel="|pred - y|",
           title=f"Pearson r = {pearson:.3f}, Spearman = {spearman:.3f}")
    return res, fig


def analyze(run_dir: str, what: str, out_dir: str, data=None, split: str = "test",
            device: str = "auto", batch_size: int | None = None, limit: int | None = None) -> list[str]:
    """Run analysis ``what`` on a run directory; writes ``OUT/<what>.json`` and ``.png``."""
    from msa_fast.robustness import save_json
    from msa_fast.train.trainer import resolve_device

    if what not in WHATS:
        raise ValueError(f"what: expected one of {WHATS}, got {what!r}")
    _need("matplotlib")
    model, state, data, cfg = load_run(run_dir, data, "best", device, batch_size)
    if split not in data.splits or len(data[split]) == 0:
        raise ValueError(f"split: {split!r} holds no samples")
    dev = resolve_device(device)
    kw = dict(split=split, batch_size=cfg.batch_size, device=dev, name=state["model"])
    if what == "gates":
        res, fig = gates(model, data, **kw)
    elif what == "tsne":
        res, fig = tsne(model, data, limit=limit, **kw)
    else:
        res, fig = location_error(model, data, **kw)
    res = {"what": what, "checkpoint": os.path.abspath(run_dir), "model": state["model"],
           "data": cfg.data, "split": split, **res}
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, what)
    save_json(base + ".json", res)
    fig.suptitle(f"{state['model']} on {cfg.data} [{split}]: {what}")
    _io.save_figure(fig, base + ".png", dpi=100)
    return [base + ".json", base + ".png"]

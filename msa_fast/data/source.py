"""Resolve a data argument: a pickle path or ``synthetic:<preset>[:<option>...]``.

Options after the preset, in any order: ``aligned`` (default) or ``unaligned``,
``seed=N`` (default 0), ``limit=N`` (first N samples per split; generation stops early),
``pid`` (the redundant/unique/synergistic generator :mod:`msa_fast.data.synthetic_pid`
instead of v1). Examples: ``synthetic:mosi``, ``synthetic:mosei:unaligned``,
``synthetic:tiny:seed=3``, ``synthetic:mosi:pid:unaligned``.
Synthetic pickles are cached by :func:`msa_fast.data.synthetic.cached` (v1) and
:func:`msa_fast.data.synthetic_pid.cached`; loaded data is also
kept in-process (the tensors are never modified in place), so repeated calls are cheap.
"""

from __future__ import annotations

import os

from msa_fast.data import synthetic, synthetic_pid
from msa_fast.data.mmsa import MMSAData, load_pickle

_MEMO: dict[tuple, MMSAData] = {}


def parse_synthetic(spec: str) -> dict:
    parts = spec.split(":")
    if parts[0] != "synthetic" or len(parts) < 2:
        raise ValueError(f"data: expected synthetic:<preset>, got {spec!r}")
    preset = parts[1]
    if preset not in synthetic.PRESETS:
        raise ValueError(
            f"data: unknown synthetic preset {preset!r} (choose from {sorted(synthetic.PRESETS)})")
    out = {"preset": preset, "seed": 0, "aligned": True, "limit": None, "pid": False}
    for opt in parts[2:]:
        if opt == "pid":
            out["pid"] = True
        elif opt in ("aligned", "unaligned"):
            out["aligned"] = opt == "aligned"
        elif opt.startswith(("seed=", "limit=")):
            key, _, val = opt.partition("=")
            if not val.isdigit() or (key == "limit" and int(val) < 1):
                want = "a positive" if key == "limit" else "a non-negative"
                raise ValueError(f"data: {key} must be {want} integer in {spec!r}, got {val!r}")
            out[key] = int(val)
        else:
            raise ValueError(f"data: unknown synthetic option {opt!r} in {spec!r}")
    return out


def load_data(spec: str, limit: int | None = None) -> MMSAData:
    """Load ``spec`` (path or synthetic spec); ``limit`` keeps the first rows of each split."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected a positive integer (samples kept per split), got {limit!r}")
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data: expected a pickle path or synthetic:<preset>, got {spec!r}")
    key = (spec, limit)
    if not spec.startswith("synthetic:") and os.path.isfile(spec):
        st = os.stat(spec)  # a file rewritten in place is not the memoised one
        key = (os.path.abspath(spec), limit, st.st_mtime_ns, st.st_size)
    if key in _MEMO:
        return _MEMO[key]
    if spec.startswith("synthetic:"):
        opts = parse_synthetic(spec)
        lim = opts["limit"] if limit is None else min(limit, opts["limit"] or limit)
        gen = synthetic_pid if opts["pid"] else synthetic
        path = gen.cached(opts["preset"], opts["seed"], opts["aligned"], lim)
        data = load_pickle(path)
        data.source = spec
    else:
        data = load_pickle(spec, limit=limit)
    if len(_MEMO) > 4:
        _MEMO.clear()
    _MEMO[key] = data
    return data

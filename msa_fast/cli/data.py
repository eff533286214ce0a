"""``msa-fast data synth --preset mosi|mosei|tiny --out PATH [--unaligned] [--seed N] [--pid]``
writes a synthetic MMSA pickle; ``msa-fast data inspect PATH|synthetic:...`` prints its
splits, shapes, label histogram and NaN/-inf counts."""

from __future__ import annotations

import os

import numpy as np

from msa_fast.cli._common import POSITIVE, Parser, UserError, check_output
from msa_fast.data.schema import SPLITS


def add_parser(sub) -> None:
    d = sub.add_parser("data", help="synthetic data and pickle inspection")
    dsub = d.add_subparsers(dest="data_cmd", required=True, parser_class=Parser)
    s = dsub.add_parser("synth", help="write a synthetic MMSA pickle")
    s.add_argument("--preset", default="mosi")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--unaligned", action="store_true")
    s.add_argument("--limit", type=POSITIVE)
    s.add_argument("--pid", action="store_true",
                   help="the redundant/unique/synergy generator (synthetic:<preset>:pid)")
    s.set_defaults(func=run_synth)
    i = dsub.add_parser("inspect", help="summarise a pickle (splits, shapes, labels, NaN/-inf)")
    i.add_argument("path")
    i.set_defaults(func=run_inspect)


def run_synth(args) -> int:
    from msa_fast.data import synthetic, synthetic_pid

    if args.preset not in synthetic.PRESETS:
        raise UserError(f"unknown preset {args.preset!r} (choose from {sorted(synthetic.PRESETS)})")
    gen = synthetic_pid if getattr(args, "pid", False) else synthetic
    check_output("--out", args.out, overwrite=args.overwrite)
    try:
        gen.write(args.out, args.preset, args.seed, not args.unaligned, args.limit)
    except OSError as e:
        raise UserError(f"--out: cannot write {args.out} ({e.strerror or type(e).__name__})") from None
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")
    return 0


def run_inspect(args) -> int:
    from msa_fast.data.source import load_data

    print(inspect_text(load_data(args.path)))
    return 0


def inspect_text(data) -> str:
    lines = [f"{data.source}: {'aligned' if data.aligned else 'unaligned'}, dims {data.dims}"]
    for name in SPLITS:
        s = data[name]
        shapes = {k: tuple(getattr(s, k).shape) for k in ("text", "text_bert", "audio", "vision")
                  if getattr(s, k) is not None}
        y = s.labels.numpy()
        hist, _ = np.histogram(np.clip(np.round(y), -3, 3), bins=7, range=(-3.5, 3.5))
        lines.append(f"{name}: N={len(s)}  " + "  ".join(f"{k} {v}" for k, v in shapes.items()))
        if len(s) == 0:
            lines.append("  empty split")
            continue
        lines.append(f"  lengths text {int(s.text_lengths.min())}-{int(s.text_lengths.max())}, "
                     f"audio {int(s.audio_lengths.min())}-{int(s.audio_lengths.max())}, "
                     f"vision {int(s.vision_lengths.min())}-{int(s.vision_lengths.max())}")
        lines.append(f"  labels mean {y.mean():+.3f} std {y.std():.3f} zeros {int((y == 0).sum())}; "
                     f"histogram of round(y) -3..3: {hist.tolist()}")
        bad = {m: c for m, c in data.report[name].items() if sum(c.values())}
        lines.append("  non-finite (set to 0): " + (", ".join(
            f"{m} " + "/".join(f"{v} {k}" for k, v in c.items() if v) for m, c in bad.items())
            or "none"))
        if "corrupted" in s.extra:
            frac = s.extra["corrupted"].float().mean(0).tolist()
            lines.append("  corrupted fraction text/audio/vision: "
                         + " / ".join(f"{f:.3f}" for f in frac))
    if data.meta.get("kind") == "pid":  # v1's summary stays as it was
        sh = data.meta.get("shares", {})
        lines.insert(1, "pid shares of var(h): " + ", ".join(f"{k} {v:.2f}" for k, v in sh.items())
                     + f"; corruption rate {data.meta.get('corrupt_rate')}")
    return "\n".join(lines)

"""``msa-fast analyze --checkpoint DIR --what gates|tsne|location-error --out DIR``: the
analyses of :mod:`msa_fast.analysis` (JSON + PNG)."""

from __future__ import annotations

import os

from msa_fast.cli._common import (
    POSITIVE,
    UserError,
    add_run_inputs,
    check_output,
    data_inputs,
    is_run_file,
)


def add_parser(sub) -> None:
    a = sub.add_parser("analyze", help="gate weights, t-SNE or location-error of a trained model")
    add_run_inputs(a, "analyse")
    a.add_argument("--what", required=True, choices=("gates", "tsne", "location-error"))
    a.add_argument("--out", required=True, help="directory for the JSON and the PNG")
    a.add_argument("--overwrite", action="store_true", help="replace an earlier <what>.json / .png in --out")
    a.add_argument("--limit", type=POSITIVE, help="tsne: at most N samples of the split (default 500)")
    a.set_defaults(func=run)


def run(args) -> int:
    from msa_fast import analysis

    if is_run_file(os.path.join(args.out, "state.json")):
        raise UserError(f"--out: {args.out} is a run directory; write the analysis elsewhere")
    for ext in (".json", ".png"):  # analysis.analyze writes OUT/<what>.json and .png
        check_output("--out", os.path.join(args.out, args.what + ext), data_inputs(args.checkpoint, args.data),
                     overwrite=args.overwrite)
    paths = analysis.analyze(args.checkpoint, args.what, args.out, data=args.data, split=args.split,
                             device=args.device, batch_size=args.batch_size, limit=args.limit)
    print("wrote " + " and ".join(paths))
    return 0

"""``msa-fast export --checkpoint DIR --format onnx|aoti --out FILE``: a run's model as ONNX or
an AOTInductor package (:mod:`msa_fast.inference.export`), checked against eager on random
inputs and the run's own test samples; its metadata in ``FILE.json``."""

from __future__ import annotations

import json
import os
import sys

from msa_fast.cli._common import UserError, add_checkpoint, check_output, data_inputs


def add_parser(sub) -> None:
    ex = sub.add_parser("export", help="export a run's model: ONNX or an AOTInductor package, checked against eager")
    add_checkpoint(ex)
    ex.add_argument("--format", required=True, choices=("onnx", "aoti"))
    ex.add_argument("--out", required=True, help="output file (.onnx / .pt2); its metadata also in <out>.json")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ex.add_argument("--weights", choices=("best", "last"), default="best")
    ex.add_argument("--layout", choices=("auto", "aligned", "unaligned"), default="auto",
                    help="one length for all modalities (aligned) or three (default: the run's data)")
    ex.set_defaults(func=run)


def run(args) -> int:
    from msa_fast.inference import Predictor
    from msa_fast.inference import export as E
    from msa_fast.train.checkpoint import atomic_write_bytes

    check_output("--out", args.out, data_inputs(args.checkpoint, None), overwrite=args.overwrite)
    check_output("--out", args.out + ".json", overwrite=args.overwrite)
    if args.format == "aoti":
        check_output("--out", args.out + ".ops.py", overwrite=args.overwrite)
    pred = Predictor.from_checkpoint(args.checkpoint, device="cpu", weights=args.weights, runtime="eager")
    run = pred.run
    want = {"aligned": True, "unaligned": False}.get(args.layout)
    aligned, real = want, None
    try:  # the run's own test samples are the real inputs the export is checked on
        data = run.load_data()
        split = data["test"] if len(data["test"]) else data["train"]
        got = [pred.export_inputs(split, n) for n in (1, min(8, len(split)))]
        if aligned is None:
            aligned = got[0][0]
        real = [inputs for is_aligned, inputs in got if is_aligned == aligned] or None
    except (OSError, ValueError, KeyError) as e:
        if aligned is None:
            raise UserError(f"--layout: the run's data cannot be read ({str(e).splitlines()[0]}); pass "
                            "--layout aligned or unaligned") from None
        print(f"msa-fast: note: checked on random inputs only (the run's data: {str(e).splitlines()[0]})",
              file=sys.stderr)
    common = {"model_name": run.model_name, "aligned": aligned, "length_buckets": pred.length_buckets,
              "real": real}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.format == "onnx":
        data_bytes, meta = E.export_onnx(pred.model, run.dims, **common)
        atomic_write_bytes(args.out, data_bytes)
    else:
        meta = E.export_aoti(pred.model, run.dims, args.out, **common)
        with open(E.LSTM_OP_SOURCE, "rb") as f:  # the one op the package calls by name
            atomic_write_bytes(args.out + ".ops.py", f.read())
    meta["msa_fast.checked_on"] = "random and the run's test samples" if real else "random inputs"
    atomic_write_bytes(args.out + ".json", (json.dumps(meta, indent=2) + "\n").encode())
    print(f"{run.model_name} -> {args.out} ({args.format}, {'aligned' if aligned else 'unaligned'}, "
          f"inputs {meta['msa_fast.inputs']}; max |exported - eager| {meta['msa_fast.checked_max_abs_diff']})")
    return 0

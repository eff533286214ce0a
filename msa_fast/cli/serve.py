"""``msa-fast serve --checkpoint DIR [--port 8000] ...``: the HTTP inference server
(:mod:`msa_fast.inference.server`; KServe v2 with binary tensors, and JSON; the serve extra)."""

from __future__ import annotations

import argparse
import importlib.util

from msa_fast.cli._common import PORT, POSITIVE, SECONDS, UserError, add_checkpoint, compile_flag


def add_parser(sub) -> None:
    from msa_fast.inference.runtimes import RUNTIMES

    sv = sub.add_parser("serve", help="HTTP inference server: KServe v2 (binary tensors) and JSON (the serve extra)")
    add_checkpoint(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=PORT, default=8000)
    sv.add_argument("--max-batch", type=POSITIVE, default=64, help="dynamic batching: most samples per batch")
    sv.add_argument("--batch-timeout", type=SECONDS, default=0.005,
                    help="dynamic batching: most seconds a batch waits for requests still arriving")
    sv.add_argument("--device", default="auto")
    sv.add_argument("--max-length", type=POSITIVE, help="longest sequence accepted (default 512)")
    sv.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile on the CPU (default: the per-model table)")
    sv.add_argument("--runtime", choices=RUNTIMES, default="auto",
                    help="how the model runs (default: the fastest measured for the model and batch)")
    sv.add_argument("--name", help="the model's name in /v2/models/{name} (default: the checkpoint's model)")
    sv.add_argument("--workers", type=POSITIVE, default=1,
                    help="processes accepting on the port, each with its own Predictor (many-core hosts)")
    sv.add_argument("--max-body", type=POSITIVE,
                    help="largest request body in bytes, refused (413) before reading (default: from "
                         "--max-length, --max-batch and the widths)")
    sv.add_argument("--warmup", default="1,max",
                    help="buckets run before /v2/health/ready: 'none' or comma-separated B, BxL or "
                         "BxLt/La/Lv (B a number or 'max'; default 1,max at the checkpoint's data lengths)")
    sv.set_defaults(func=run)


def run(args) -> int:
    from msa_fast.train.checkpoint import resolve_run

    resolve_run(args.checkpoint)  # no run there: one line, before the serve extra is looked for
    missing = [m for m in ("uvicorn", "starlette", "prometheus_client")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"serve needs {', '.join(missing)}: pip install 'msa_fast[serve]'")
    from msa_fast.inference.server import serve

    return serve(args.checkpoint, host=args.host, port=args.port, max_batch=args.max_batch,
                 batch_timeout=args.batch_timeout, device=args.device,
                 compile=compile_flag(args.compile), max_length=args.max_length, runtime=args.runtime,
                 name=args.name, workers=args.workers, max_body=args.max_body, warmup=args.warmup)

"""The ``msa-fast`` command line (``python -m msa_fast`` is the same).

- ``msa-fast train --model lf_dnn --data synthetic:mosi [--seeds 1111 1112] [--out DIR]``
  trains, prints MMSA's test metrics (mean ± std over seeds) and writes ``DIR/results.json``.
- ``msa-fast eval --checkpoint DIR/seed_1111 [--data ...] [--split test]`` evaluates the
  best weights of a run directory.
- ``msa-fast data synth --preset mosi|mosei|tiny --out PATH [--unaligned] [--seed N] [--pid]``.
- ``msa-fast data inspect PATH|synthetic:...``: splits, shapes, label histogram, NaN/-inf.
- ``torchrun --nproc_per_node=N -m msa_fast train ...``: data-parallel training
  (:mod:`msa_fast.train.distributed`); ``--batch-size`` is the global batch.
- ``msa-fast eval --checkpoint DIR --robustness missing|drop|noise|all [--seeds ...] [--out
  FILE.json] [--plot FILE.png] [--reference RUN_DIR]``: the sweeps of :mod:`msa_fast.robustness`;
  ``msa-fast robustness table A.json B.json ...``: one markdown table of sweeps.
- ``msa-fast analyze --checkpoint DIR --what gates|tsne|location-error --out DIR``: the
  analyses of :mod:`msa_fast.analysis` (JSON + PNG).
- ``msa-fast predict`` / ``export`` / ``serve --checkpoint DIR ...``: inference
  (:mod:`msa_fast.inference`).

Layout: one module per subcommand (``msa_fast/cli/<name>.py``), each with
``add_parser(subparsers)`` that ends in ``set_defaults(func=run)``; :func:`main` calls
``args.func(args)``. What they share is in :mod:`msa_fast.cli._common`. A ``--checkpoint`` is
read by the one run loader, :func:`msa_fast.train.checkpoint.load_run`.

Errors the user can fix (bad path, wrong schema, an unsafe pickle, unknown model or
hyper-parameter, bad config, a run directory that holds another run or is locked, a
truncated checkpoint) print one line ``msa-fast: error: ...`` on stderr and exit with status
2; a non-finite training loss or a non-finite / diverged valid loss exits with 3, the last
good checkpoint intact; no traceback. Anything else (a bug, out of memory, a library's
internal error) prints its traceback and exits 1: it is never dressed as a user error.
``--traceback`` (or ``MSA_FAST_DEBUG=1``) shows the traceback of any error.
"""

from __future__ import annotations

import argparse
import os
import sys

from msa_fast.cli import analyze, data, export, predict, robustness, serve, train
from msa_fast.cli import eval as eval_  # the module, not the builtin
from msa_fast.cli._common import Parser, UserError, config_from_args

# the subcommands, in the order of ``msa-fast --help``
SUBCOMMANDS = (train, eval_, analyze, predict, export, serve, data, robustness)

__all__ = ["SUBCOMMANDS", "UserError", "build_parser", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="msa-fast", description=__doc__.split("\n\n")[0])
    p.add_argument("--traceback", action="store_true",
                   help="show the full traceback of an error (also MSA_FAST_DEBUG=1)")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    for mod in SUBCOMMANDS:
        mod.add_parser(sub)
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a flag error already printed in one line
        return e.code if isinstance(e.code, int) else 2
    from msa_fast.data.schema import SchemaError
    from msa_fast.models import UnknownModelError
    from msa_fast.train.trainer import NonFiniteLossError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("msa-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        if args.traceback or os.environ.get("MSA_FAST_DEBUG") == "1":
            raise
        if isinstance(e, NonFiniteLossError):
            print(f"msa-fast: error: {e}", file=sys.stderr)
            return 3
        if _is_user_error(e, (UserError, SchemaError, UnknownModelError)):
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if isinstance(e, OSError) and e.filename and e.strerror:
                msg = f"{e.filename}: {e.strerror}"
            print(f"msa-fast: error: {msg}", file=sys.stderr)
            return 2
        # a bug or a resource failure (out of memory, a library's internal error): never
        # dressed as a user error
        import traceback

        traceback.print_exc()
        print(f"msa-fast: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(the traceback above; please report it)", file=sys.stderr)
        return 1


def _is_user_error(e: BaseException, ours: tuple) -> bool:
    """Bad input or a bad environment, said in one line: our own error types, every
    ``ValueError`` (the project's convention for bad input: it names the argument) and
    ``OSError`` (a missing or unwritable file), and a ``RuntimeError`` that a ``raise`` of
    msa_fast itself threw (a backend or device that is not available); a ``RuntimeError``
    from inside torch or another library is not, even when its innermost Python frame is ours
    (a C++ error surfaces at the line that called the op): that is a bug or out of memory."""
    import linecache

    if isinstance(e, (*ours, ValueError, OSError)):
        return True
    if isinstance(e, RuntimeError):
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is None:
            return False
        module = tb.tb_frame.f_globals.get("__name__", "")
        line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).strip()
        return (module == "msa_fast" or module.startswith("msa_fast.")) and line.startswith("raise")
    return False

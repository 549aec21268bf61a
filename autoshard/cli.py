"""The ``autoshard`` command line (also ``python -m autoshard``)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(steps=args.steps, global_batch=args.batch, dp=args.dp, tp=args.tp, verbose=args.explain)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoshard", description="Train an unmodified PyTorch model on many devices.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="train a small GPT on 4 CPU ranks and check parity with one process",
                       description="Train a small GPT sharded over CPU ranks (Gloo) and compare it with the "
                                   "unmodified model trained on one process. Exit code 1 if parity fails.")
    d.add_argument("--steps", type=int, default=50, help="optimizer steps (default 50)")
    d.add_argument("--batch", type=int, default=8, help="global batch, sequences (default 8)")
    d.add_argument("--dp", type=int, default=2, help="data-parallel degree (default 2)")
    d.add_argument("--tp", type=int, default=2, help="tensor-parallel degree (default 2)")
    d.add_argument("--explain", action="store_true", help="print the whole plan, not just its summary")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - CLI boundary: one line on stderr, non-zero exit
        from autoshard.runtime.errors import AutoshardError

        if isinstance(e, AutoshardError):
            print(f"autoshard: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

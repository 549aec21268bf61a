"""The ``autoshard`` command line (also ``python -m autoshard``).

Commands: ``demo`` (train a small GPT sharded over CPU ranks and check parity), ``viz`` (draw the
rewritten graph of a model sharded on a virtual mesh) and ``check`` (which ops and parameters were
sharded, and which ops fell back to replicated execution). Exit codes: 0 success, 1 the command's
check failed (demo: parity; check: fallbacks), 2 usage or plan errors, reported on stderr as
``autoshard: error: ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_LOSSES = ("cross_entropy", "mse", "model")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(steps=args.steps, global_batch=args.batch, dp=args.dp, tp=args.tp, verbose=args.explain)


# ====================================================================================== shared by viz and check
def _console(stderr: bool = False):
    """A rich console; wide when not a terminal, so tables written to files or pipes keep whole names."""
    from rich.console import Console

    con = Console(stderr=stderr)
    if not con.is_terminal:
        con = Console(stderr=stderr, width=max(con.width, 160), no_color=True)
    return con


def _loss_fn(spec: str) -> Callable | None:
    """``--loss``: a built-in name, or ``module:function`` / ``file.py:function`` with (output, target) → scalar."""
    import torch.nn.functional as F

    def logits(out: Any) -> Any:
        return getattr(out, "logits", out)

    if spec == "cross_entropy":
        return lambda out, target: F.cross_entropy(logits(out).flatten(0, -2), target.flatten())
    if spec == "mse":
        return lambda out, target: F.mse_loss(logits(out), target)
    if spec == "model":
        return None
    from .modelspec import load_object

    if ":" not in spec:
        raise ValueError(f"--loss {spec!r}: expected one of {', '.join(_LOSSES)} or module:function / file.py:function")
    fn, call_args, _ = load_object(spec)
    if call_args is not None or not callable(fn):
        raise ValueError(f"--loss {spec!r} must name a function loss(output, target) -> scalar tensor")
    return fn


@contextmanager
def _status(console, text: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr while ``text`` goes on; yields a function that updates the message."""
    with console.status(f"[bold]{text}[/bold]", spinner="dots") as st:
        yield lambda msg: st.update(f"[bold]{text}[/bold]: {msg}")


def _lower(args: argparse.Namespace, err) -> Any:
    """Load the model, make its example inputs, and shard it on a virtual mesh: the work of viz and check."""
    from rich.markup import escape

    from . import viz
    from .modelspec import load_model, make_inputs, parse_mesh

    mesh = parse_mesh(args.mesh)
    loss_fn = _loss_fn(args.loss)
    with _status(err, f"loading {escape(args.model)}") as say:
        model = load_model(args.model)
        pos, kw = make_inputs(args.input, model)
        if pos and kw:
            raise ValueError("--input: give the inputs either all positionally or all by name (NAME=DTYPE[...]); "
                             "a model here takes one or the other")
        say("capturing and planning")
        low = viz.lower(model, mesh, pos, kw, loss_fn=loss_fn, schedule=args.schedule,
                        microbatches=args.microbatches, virtual_stages=args.virtual_stages, progress=say)
    low.inputs = args.input
    return low


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command; usage, spec and plan errors become one line on stderr and exit code 2."""
    def run(args: argparse.Namespace) -> int:
        from autoshard.runtime.errors import AutoshardError

        try:
            return fn(args)
        except (ValueError, AutoshardError, OSError) as e:
            text = str(e).strip() or type(e).__name__
            print(f"autoshard: error: {text}", file=sys.stderr)
            return EXIT_USAGE

    run.__doc__ = fn.__doc__
    return run


# ====================================================================================== viz
_EXTENSIONS = {".html": "html", ".htm": "html", ".svg": "svg", ".dot": "dot", ".gv": "dot", ".json": "json"}


def _viz(args: argparse.Namespace) -> int:
    """``autoshard viz``: draw the rewritten graph (html, svg, dot or json)."""
    from . import viz

    fmt = args.format
    if fmt is None:
        ext = os.path.splitext(args.output or "")[1].lower()
        fmt = _EXTENSIONS.get(ext, "html")
    out = args.output
    if out is None:
        out = "autoshard_viz.html" if fmt == "html" else "-"
    err = _console(stderr=True)
    low = _lower(args, err)
    with _status(err, "drawing"):
        view = viz.build_view(low, collapse=not args.no_fold)
        text = viz.render(view, fmt)
    if out == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
    ncoll = sum(1 for v in view.nodes if v.kind == "collective")
    where = "stdout" if out == "-" else out
    err.print(f"wrote {fmt} to {where}: {len(view.nodes)} nodes, {ncoll} collectives drawn, "
              f"{len(low.plan.fallbacks)} fallbacks", markup=False, highlight=False)
    return EXIT_OK


# ====================================================================================== check
def _check(args: argparse.Namespace) -> int:
    """``autoshard check``: op and parameter coverage; exit 1 when ops fell back to replicated execution."""
    from rich.table import Table
    from rich.text import Text

    from . import viz

    err = _console(stderr=True)
    low = _lower(args, err)
    plan = low.plan
    con = _console()
    con.print(Text(f"autoshard check: {low.model_name} on {viz.mesh_text(plan.mesh)} (virtual mesh, rank 0's "
                   f"program), inputs {args.input}", style="bold"), soft_wrap=True)
    con.print(Text(plan.summary()), soft_wrap=True)

    cov = viz.op_coverage(low)
    t = Table(title="Ops in the rewritten graph", title_justify="left")
    t.add_column("op")
    for col, style in (("sharded", "blue"), ("replicated", ""), ("fallback", "red")):
        t.add_column(col, justify="right", style=style)
    totals = [0, 0, 0]
    for op, row in cov.items():
        vals = [row["sharded"], row["replicated"], row["fallback"]]
        totals = [a + b for a, b in zip(totals, vals)]
        t.add_row(Text(op), *(str(v) if v else "·" for v in vals))
    t.add_section()
    t.add_row(Text("total", style="bold"), *(str(v) for v in totals))
    con.print(t)
    coll = viz.collective_counts(low)
    con.print(Text("collectives inserted: " + (", ".join(f"{n} {op}" for op, n in sorted(coll.items())) or "none")),
              soft_wrap=True)

    p = Table(title="Parameters", title_justify="left")
    for col in ("name", "shape", "placement", "local shape", "role"):
        p.add_column(col, no_wrap=col == "name")
    for name, lay in plan.params.items():
        role = lay.role + (f" ({lay.blocks} fused blocks)" if lay.blocks > 1 else "")
        shown = name + (f" (= {', '.join(lay.aliases)})" if lay.aliases else "")
        p.add_row(Text(shown), str(lay.shape), lay.placement, str(lay.local_shape), Text(role))
    con.print(p)

    if not plan.fallbacks:
        con.print(Text("fallbacks: none; every op has a sharding rule for its inputs", style="green"))
        return EXIT_OK
    f = Table(title=f"Fallbacks ({len(plan.fallbacks)}): ops run replicated, their sharded inputs gathered",
              title_justify="left", title_style="bold red")
    for col in ("op", "node", "module", "reason", "source"):
        f.add_column(col)
    for fb in plan.fallbacks:
        f.add_row(*(Text(str(fb.get(k, "")) or "-") for k in ("op", "node", "module", "reason", "source")))
    con.print(f)
    con.print(Text(f"{len(plan.fallbacks)} fallback(s): give these ops a sharding rule, or change the model "
                   "so their inputs are not split (exit code 1)", style="red"))
    return EXIT_FAILED


# ====================================================================================== parser
_VIZ_DESCRIPTION = """\
Shard MODEL on a virtual mesh (no processes; rank 0's view) and draw the
rewritten graph: nodes grouped by pipeline stage and module, edges labelled
with placement (R, S(d), P) and local shape, collectives with the bytes they
move, fallbacks with their reason and source line, and repeated blocks folded
into one group marked '× N'. The HTML page is self-contained (no network
references) and adds the pipeline schedule timeline (pp > 1) and per-rank
memory."""

_CHECK_DESCRIPTION = """\
Shard MODEL on a virtual mesh and print its op coverage (per op: nodes run on
shards, run replicated, or fallen back), every parameter's placement and role,
and the fallbacks with their reason and source line."""


def _model_args(p: argparse.ArgumentParser) -> None:
    from autoshard.runtime.schedules import SCHEDULES

    p.add_argument("model", metavar="MODEL",
                   help="path/to/file.py:name or package.module:name: a nn.Module class, a function returning a "
                        "module, or a module; literal arguments may follow, e.g. "
                        "'autoshard.examples.gpt:make_model(n_layers=4)'")
    p.add_argument("--mesh", default="tp=2", metavar="DIMS",
                   help="mesh degrees, e.g. 'dp=2,tp=2' or 'pp=2,tp=2' (dims pp, dp, tp; default tp=2). Planned on "
                        "a virtual mesh: no processes are started")
    p.add_argument("--input", required=True, metavar="SPEC",
                   help="one local batch as DTYPE[shape], comma-separated for several inputs, NAME=DTYPE[shape] for "
                        "keyword inputs, e.g. 'int64[8,1024]'. Integer inputs are random ids below the model's "
                        "config.vocab_size / cfg.vocab_size")
    p.add_argument("--loss", default="cross_entropy", metavar="LOSS",
                   help="cross_entropy (default), mse, model (the model returns its loss), or module:function / "
                        "file.py:function. It does not change the plan")
    p.add_argument("--schedule", default="1f1b", choices=SCHEDULES, help="pipeline schedule when pp > 1 (default 1f1b)")
    p.add_argument("--microbatches", type=int, default=None, metavar="N",
                   help="microbatches per step when pp > 1 (default 2·pp when it divides the batch, else pp)")
    p.add_argument("--virtual-stages", type=int, default=1, metavar="V",
                   help="pipeline stages per rank (interleaved_1f1b: 2 or more; default 1)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoshard", description="Train an unmodified PyTorch model on many devices.",
        epilog="exit codes: 0 success, 1 the check failed (demo: parity; check: fallbacks), 2 usage or plan error")
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

    v = sub.add_parser(
        "viz", help="draw the rewritten graph of a model sharded on a virtual mesh",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_VIZ_DESCRIPTION,
        epilog="example:\n  autoshard viz autoshard.examples.gpt:make_model --mesh dp=2,tp=2 --input 'int64[8,64]' "
               "-o gpt.html\nexit codes: 0 written, 2 usage or plan error")
    _model_args(v)
    v.add_argument("-o", "--output", default=None, metavar="PATH",
                   help="where to write ('-' for stdout); default autoshard_viz.html for html, stdout otherwise")
    v.add_argument("--format", choices=("html", "svg", "dot", "json"), default=None,
                   help="html (default, or from the extension of -o), svg (the graph alone), dot (graphviz) or json")
    v.add_argument("--no-fold", action="store_true", help="draw every repeated block instead of one marked '× N'")
    v.set_defaults(func=_guarded(_viz))

    c = sub.add_parser(
        "check", help="which ops and parameters are sharded, and which ops fall back",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_CHECK_DESCRIPTION,
        epilog="example:\n  autoshard check autoshard.examples.gpt:make_model --mesh tp=4 --input 'int64[8,64]'\n"
               "exit codes: 0 no fallbacks, 1 some ops fell back to replicated execution, 2 usage or plan error")
    _model_args(c)
    c.set_defaults(func=_guarded(_check))
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

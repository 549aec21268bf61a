"""The ``autoshard`` command line (also ``python -m autoshard``).

Commands: ``demo`` (train a small GPT sharded over CPU ranks and check parity), ``viz`` (draw the
rewritten graph of a model sharded on a virtual mesh), ``check`` (which ops and parameters were
sharded, and which ops fell back to replicated execution), ``plan`` (choose a parallelisation from
the cost model; ``--diff`` compares two plans) and ``calibrate`` (measure this machine into a
hardware profile). Exit codes: 0 success, 1 the command's check failed (demo: parity; check:
unexplained fallbacks; plan --diff: the decisions differ), 2 usage or plan errors (including "no feasible
plan"), reported on stderr as ``autoshard: error: ...``.

Why this module is long: every command's parser, help text and error handling sit together, with
the heavy imports inside the commands, so `autoshard --help` starts without torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_LOSSES = ("cross_entropy", "mse", "model")
# runtime.schedules.SCHEDULES, spelled out so that building the parser (and --help) imports no torch;
# tests/test_cli.py checks that the two agree
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")


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
    """``autoshard check``: op and parameter coverage.

    Exit 1 when ops fell back to replicated execution for a reason other than the one that is expected: a
    loss computed in the graph (a Hugging Face model given ``labels``) over vocab-sharded logits gathers them,
    exactly what a ``loss_fn`` at the graph output costs, so that fallback alone exits 0 and is listed.
    """
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
    from autoshard.passes.sharding_rules import LOSS_GATHER

    unexplained = [fb for fb in plan.fallbacks if fb.get("reason") != LOSS_GATHER]
    if not unexplained:  # an in-graph loss over sharded logits gathers them, as a loss_fn at the output would
        con.print(Text(f"{len(plan.fallbacks)} explained fallback(s) (a loss over vocab-sharded logits gathers "
                       "them, as it would at the graph output); nothing unexplained", style="green"))
        return EXIT_OK
    con.print(Text(f"{len(unexplained)} fallback(s): give these ops a sharding rule, or change the model "
                   "so their inputs are not split (exit code 1)", style="red"))
    return EXIT_FAILED


# ====================================================================================== plan
def _meta_inputs(text: str, model: Any) -> tuple[tuple, dict]:
    """``--input`` as meta tensors of the given (global) shapes: shapes are all the planner reads."""
    import torch

    from .modelspec import parse_input_specs

    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for name, dtype, dims in parse_input_specs(text):
        t = torch.empty(dims, dtype=dtype, device="meta")
        if name is None:
            args.append(t)
        else:
            kwargs[name] = t
    if args and kwargs:
        raise ValueError("--input: give the inputs either all positionally or all by name (NAME=DTYPE[...])")
    return tuple(args), kwargs


def _load_meta_model(spec: str) -> Any:
    """Build MODEL on the meta device (no memory, no initialisation cost); fall back to a real build."""
    import torch

    from .modelspec import load_model

    try:
        with torch.device("meta"):
            return load_model(spec)
    except ValueError as meta_error:
        try:
            return load_model(spec)
        except ValueError:
            raise meta_error from None


def _parse_fix(text: str | None) -> dict[str, Any]:
    """``--fix 'tp=8,zero=1,offload=none,schedule=1f1b'`` → pinned planner choices."""
    if not text:
        return {}
    out: dict[str, Any] = {}
    ints = {"dp", "tp", "pp", "ep", "zero", "microbatches"}
    for item in text.split(","):
        key, eq, value = item.strip().partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in ints | {"offload", "schedule"}:
            raise ValueError(f"--fix {text!r}: {item.strip()!r} is not KEY=VALUE with KEY one of "
                             f"{', '.join(sorted(ints | {'offload', 'schedule'}))}")
        if key in ints:
            try:
                out[key] = int(value)
            except ValueError:
                raise ValueError(f"--fix {text!r}: {key}={value!r} is not an integer") from None
        elif key == "offload":
            out[key] = None if value.lower() in ("none", "") else value
        else:
            out[key] = value
    return out


def _plan(args: argparse.Namespace) -> int:
    """``autoshard plan``: choose dp/tp/pp/ep, ZeRO, offload, micro-batches, schedule and checkpointing."""
    from autoshard.passes import cost_model, planner
    from autoshard.runtime.hardware import get_profile

    if args.diff:
        return _plan_diff(args.diff)
    missing = [f for f, v in (("MODEL", args.model), ("--gpus", args.gpus), ("--input", args.input)) if v is None]
    if missing:
        raise ValueError(f"plan needs {', '.join(missing)} (or --diff A.json B.json)")
    if args.gpus < 1:
        raise ValueError(f"--gpus {args.gpus}: must be >= 1")
    if args.gpus_per_node is not None and args.gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node {args.gpus_per_node}: must be >= 1")
    profile = get_profile(args.gpu)
    precision = args.precision or ("fp32" if profile.name == "cpu" else "bf16")
    err = _console(stderr=True)
    with _status(err, f"analysing {args.model}"):
        model = _load_meta_model(args.model)
        pos, kw = _meta_inputs(args.input, model)
        gpn = min(args.gpus_per_node or profile.gpus_per_node, args.gpus)
        tps = tuple(t for t in range(1, gpn + 1) if gpn % t == 0 and args.gpus % t == 0)
        name = args.model.split(":")[-1].split("(")[0]
        analysis = cost_model.analyse(model, pos, kw, precision=precision, tps=tps,
                                      loss=None if args.loss == "model" else "cross_entropy", name=name)
    space = planner.runtime_space(_parse_fix(args.fix)) if args.runtime_only else \
        planner.SearchSpace(fixed=tuple(sorted(_parse_fix(args.fix).items())))
    result = planner.plan(analysis, args.gpus, profile, memory_gib=args.memory_gib,
                          gpus_per_node=args.gpus_per_node, space=space, alternatives=args.top)
    text = result.to_json() + "\n" if args.json else (result.explain() if args.explain else _plan_brief(result)) + "\n"
    if args.output and args.output != "-":
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        err.print(f"wrote the plan to {args.output}", markup=False, highlight=False)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _plan_brief(result: Any) -> str:
    """The default ``plan`` output: the decision, its predictions, the binding constraint, the runners-up."""
    from autoshard.passes.planner import gib

    lines = [f"plan: {result.decision_text()}",
             f"  step {result.step_time_s * 1e3:,.1f} ms, {result.tokens_per_s:,.0f} tokens/s, MFU "
             f"{100 * result.mfu:.1f}%; {gib(result.memory_per_gpu_bytes)} of {gib(result.budget_bytes)} "
             f"per GPU on {result.gpus} x {result.hardware['name']}",
             f"  binding: {result.binding}"]
    if not result.runnable:
        lines.append(f"  note: not runnable by this autoshard yet ({result.runnable_reason}); --runtime-only plans "
                     "within what it runs")
    feasible = [a for a in result.alternatives if a["feasible"]]
    if feasible:
        lines.append("  alternatives:")
        for a in feasible:
            lines.append(f"    {a['plan']:<56} {a['step_time_s'] * 1e3:10,.1f} ms ({a['slowdown'] * 100:+.1f}%)  "
                         f"{gib(a['memory_per_gpu_bytes'])}")
    lines.append("  (--explain says why, --json gives the data)")
    return "\n".join(lines)


def _plan_diff(paths: list[str]) -> int:
    """``autoshard plan --diff A B``: exit 0 when the decisions agree, 1 when they differ."""
    from autoshard.passes.planner import AutoPlan, diff

    plans = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                plans.append(AutoPlan.from_json(f.read()))
        except ValueError as e:  # PlanFileError names the key at fault; UnicodeDecodeError a binary file
            raise ValueError(f"--diff {path}: {e}") from None
        except OSError as e:
            raise ValueError(f"--diff {path}: cannot read it ({e.strerror or e})") from None
    changed, lines = diff(plans[0], plans[1])
    print(f"--- {paths[0]}: {plans[0].decision_text()}")
    print(f"+++ {paths[1]}: {plans[1].decision_text()}")
    print("\n".join(lines))
    return EXIT_FAILED if changed else EXIT_OK


# ====================================================================================== calibrate
def _calibrate(args: argparse.Namespace) -> int:
    """``autoshard calibrate``: measure this machine and store a hardware profile."""
    import json

    import torch

    from autoshard.runtime import hardware

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    err = _console(stderr=True)
    allreduce = None
    with _status(err, f"measuring {device}") as say:
        if args.nprocs > 1:
            from .launch import launch

            say(f"all-reduce over {args.nprocs} ranks")
            sizes = [2**20, 16 * 2**20] if args.quick else [2**20, 16 * 2**20, 128 * 2**20]
            allreduce = launch(hardware.allreduce_worker, args.nprocs, sizes, device=device)[0]
        say("matmul, copy and dispatch rates")
        prof = hardware.calibrate(device, name=args.name, quick=args.quick, allreduce=allreduce)
    path = args.out or os.path.join(hardware.profile_dir(), f"{prof.name}.json")
    prof.save(path)
    if args.json:
        print(json.dumps(prof.to_dict(), indent=1, sort_keys=True))
    else:
        rates = ", ".join(f"{k} {v:.3g}" for k, v in prof.matmul_tflops.items())
        print(f"profile {prof.name}: matmul TFLOP/s {rates}; memory {prof.memory_gbps:.3g} GB/s; "
              f"{prof.op_overhead_us:.3g} us per eager op"
              + (f"; all-reduce bus {prof.intra_gbps:.3g} GB/s, {prof.intra_latency_us:.3g} us per step" if allreduce
                 else ""))
    print(f"wrote {path}; plan with it: autoshard plan MODEL --gpu {path if args.out else prof.name} ...")
    return EXIT_OK


# ====================================================================================== parser
_VIZ_DESCRIPTION = """\
Shard MODEL on a virtual mesh (no processes; rank 0's view) and draw the
rewritten graph: nodes grouped by pipeline stage and module, inputs named by
their arguments, edges labelled with placement (R, S(d), P) and local shape,
collectives with the bytes they move, fallbacks with their reason and source
line, repeated blocks folded into one group marked '× N', and the attention
mask and position ops folded into one box. The HTML page is self-contained
(no network references) and adds a legend of the mesh (what dp, tp, pp, ep,
cp split), one step of rank 0 in time (compute and communication, their
overlap) with its memory over time, the pipeline schedule (pp > 1) and
per-rank memory."""

_CHECK_DESCRIPTION = """\
Shard MODEL on a virtual mesh and print its op coverage (per op: nodes run on
shards, run replicated, or fallen back), every parameter's placement and role,
and the fallbacks with their reason and source line."""


_BENCH_DESCRIPTION = """\
Train one model under autoshard and under the systems people use instead, in one run, with the same
data, precision (bf16 on GPUs) and optimizer (AdamW), and print tokens/s/GPU, MFU, peak memory and the
ratio to the best peer. On CPU ranks (--device cpu) the run checks that every system runs and computes the
same function: it prints tokens/s/rank, which are not performance figures, and ranks no system. Runs under torchrun, or starts --nproc local ranks itself. Each system's
first-step loss is printed too: they must agree, since every system computes the same function.
A system that fails (out of memory) is reported and the run goes on."""

_PLAN_DESCRIPTION = """\
Plan how to parallelise MODEL on a cluster: mesh degrees (dp, tp, pp, ep),
ZeRO stage, offload, micro-batches, pipeline schedule and activation
checkpointing, minimising the predicted step time under the per-GPU memory
budget. The model is built on the meta device and one block of it is
captured and costed (FLOPs, bytes, saved activations, tensor-parallel
collectives); the cluster is a hardware profile. No GPU is needed: plan for
512 GPUs on a laptop. --input is the GLOBAL batch of one optimizer step.
An impossible request exits 2 naming the binding constraint."""


def _model_args(p: argparse.ArgumentParser) -> None:
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
        epilog="exit codes: 0 success, 1 the check failed (demo: parity; check: unexplained fallbacks; plan --diff: "
               "the decisions differ), 2 usage or plan error (plan: no feasible plan)")
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
    v.add_argument("--no-fold", action="store_true", help="draw every repeated block and every op (no '× N' groups, no folded boxes)")
    v.set_defaults(func=_guarded(_viz))

    c = sub.add_parser(
        "check", help="which ops and parameters are sharded, and which ops fall back",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_CHECK_DESCRIPTION,
        epilog="example:\n  autoshard check autoshard.examples.gpt:make_model --mesh tp=4 --input 'int64[8,64]'\n"
               "exit codes: 0 no fallbacks, 1 some ops fell back to replicated execution, 2 usage or plan error; a loss "
               "computed in the model over vocab-sharded logits gathers them (as a loss_fn at the output would): "
               "that fallback is listed as explained and exits 0")
    _model_args(c)
    c.set_defaults(func=_guarded(_check))

    pl = sub.add_parser(
        "plan", help="choose the mesh, ZeRO stage, micro-batches and checkpointing from a cost model",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=_PLAN_DESCRIPTION,
        epilog="examples:\n  autoshard plan path/to/model.py:make_model --gpus 512 --gpus-per-node 8 --gpu h100 "
               "--input 'int64[1024,4096]'\n  autoshard plan ... --json > a.json;  autoshard plan --diff a.json b.json\n"
               "exit codes: 0 planned (--diff: same decisions), 1 --diff: decisions differ, 2 usage error or no "
               "feasible plan (the message names the binding constraint)")
    pl.add_argument("model", metavar="MODEL", nargs="?",
                    help="path/to/file.py:name or package.module:name (a module class, a factory or a module); built "
                         "on the meta device, so planning a 70B model costs no memory")
    pl.add_argument("--gpus", type=int, metavar="N", help="GPUs (ranks) to plan for")
    pl.add_argument("--gpus-per-node", type=int, default=None, metavar="G",
                    help="GPUs per node sharing the fast link (default: the profile's, 8 for h100/h200)")
    pl.add_argument("--gpu", default="h100", metavar="PROFILE",
                    help="hardware profile: h100, h200, cpu, a stored calibration name or a profile .json "
                         "(default h100)")
    pl.add_argument("--input", metavar="SPEC",
                    help="the GLOBAL batch of one optimizer step as DTYPE[shape], e.g. 'int64[1024,4096]' "
                         "(sequences x tokens); NAME=DTYPE[shape] for keyword inputs")
    pl.add_argument("--memory-gib", type=float, default=None, metavar="X",
                    help="per-GPU memory budget in GiB (default: the profile's memory minus its reserve)")
    pl.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                    help="compute precision (default bf16 on GPU profiles, fp32 on cpu)")
    pl.add_argument("--loss", choices=("cross_entropy", "model"), default="cross_entropy",
                    help="cross_entropy: the loss is computed on the model's logits (default); model: the model "
                         "returns its loss")
    pl.add_argument("--fix", default=None, metavar="CHOICES",
                    help="pin choices, e.g. 'tp=8,zero=1' (keys dp, tp, pp, ep, zero, offload, microbatches, schedule)")
    pl.add_argument("--runtime-only", action="store_true",
                    help="only plans this autoshard runs today")
    pl.add_argument("--top", type=int, default=5, metavar="K", help="alternatives to report (default 5)")
    out = pl.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the plan as JSON (mesh, zero, microbatches, "
                                                         "memory_per_gpu_bytes, step_time_s, mfu, alternatives, ...)")
    out.add_argument("--explain", action="store_true",
                     help="why this plan: time and memory term by term, the binding constraint, the alternatives")
    pl.add_argument("-o", "--output", default=None, metavar="PATH", help="write the output here instead of stdout")
    pl.add_argument("--diff", nargs=2, metavar=("A.json", "B.json"), default=None,
                    help="compare two plans written by --json (exit 1 when their decisions differ)")
    pl.set_defaults(func=_guarded(_plan))

    cal = sub.add_parser(
        "calibrate", help="measure this machine (matmul, memory, all-reduce) and store a hardware profile",
        description="Measure the achieved matmul rate per dtype, device copy bandwidth, per-op dispatch time and, "
                    "with --nprocs > 1, the all-reduce bus bandwidth and latency between local ranks (Gloo on CPU, "
                    "NCCL on GPUs); write a hardware profile for `autoshard plan --gpu NAME`.",
        epilog="exit codes: 0 measured and written, 2 usage error")
    cal.add_argument("--device", choices=("cpu", "cuda"), default=None, help="what to measure (default: cuda if any)")
    cal.add_argument("--nprocs", type=int, default=1, metavar="N",
                     help="local ranks for the all-reduce measurement (default 1: skip it)")
    cal.add_argument("--name", default=None, help="profile name (default <device>-calibrated)")
    cal.add_argument("--out", default=None, metavar="PATH",
                     help="where to write the profile JSON (default: the profile directory, "
                          "$AUTOSHARD_PROFILES or ~/.cache/autoshard/profiles)")
    cal.add_argument("--quick", action="store_true", help="smaller, faster measurements")
    cal.add_argument("--json", action="store_true", help="print the profile as JSON")
    cal.set_defaults(func=_guarded(_calibrate))

    b = sub.add_parser(
        "bench", help="time autoshard and its peers (DDP, FSDP2, DTensor TP, compiled) on one model, in one run",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=_BENCH_DESCRIPTION,
        epilog="examples:\n  autoshard bench --model 953m --nproc 4 --results benchmarks/results.json\n"
               "  torchrun --nproc-per-node 4 -m autoshard bench --model 6.7b --systems fsdp2_compile,autoshard:zero=3\n"
               "  autoshard bench --plot benchmarks/results.json -o benchmarks/results.png\n"
               "  autoshard bench --report benchmarks/results.json\n"
               "exit codes: 0 measured (or drawn), 1 every system failed, 2 usage error")
    b.add_argument("--model", default="953m",
                   help="953m, 6.7b (Llama-style), moe (MoE GPT, 8 experts top-2), tiny, tiny-moe (default 953m)")
    b.add_argument("--systems", default=None, metavar="LIST",
                   help="comma-separated: eager compile ddp ddp_compile fsdp2 fsdp2_compile tp tp_compile autoshard "
                        "autoshard:K=V,... (default: every peer that applies, the automatic plan and named plans)")
    b.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="ranks to start when not under torchrun (default: every visible GPU, or 2 CPU ranks)")
    b.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    b.add_argument("--batch", type=int, default=None, help="sequences per GPU (default: the model's)")
    b.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's)")
    b.add_argument("--warmup", type=int, default=2, help="warm-up steps (compiled systems get 2 more; default 2)")
    b.add_argument("--iters", type=int, default=6, help="timed steps, the median is reported (default 6)")
    b.add_argument("--profile", action="store_true",
                   help="also profile 2 steps of each system: matmul, attention, communication, fused, idle time")
    b.add_argument("--results", default=None, metavar="FILE",
                   help="append the records to this JSON list (each as soon as its system is measured)")
    b.add_argument("--json", action="store_true", help="print the records as JSON")
    b.add_argument("--commit", default=None, help="the commit to record (default: git, or $AUTOSHARD_COMMIT)")
    b.add_argument("--plot", default=None, metavar="RESULTS",
                   help="draw RESULTS (a results file) as a PNG (-o, default RESULTS with .png); runs nothing")
    b.add_argument("--report", default=None, metavar="RESULTS",
                   help="print RESULTS as Markdown tables, the latest figure of each system; runs nothing")
    b.add_argument("-o", "--output", default=None, metavar="PATH", help="where --plot (or --report) writes")
    b.set_defaults(func=_guarded(_bench))
    return p


def _bench(args: argparse.Namespace) -> int:
    from autoshard import bench

    if args.plot or args.report:
        records = bench.load_results(args.plot or args.report)
        if args.report:
            text = bench.report(records)
            if args.output and not args.plot:
                with open(args.output, "w") as f:
                    f.write(text + "\n")
            else:
                print(text)
        if args.plot:
            out = bench.plot(records, args.output or os.path.splitext(args.plot)[0] + ".png")
            print(f"wrote {out}", file=sys.stderr)
        return EXIT_OK
    systems = bench.split_systems(args.systems or "")
    for s in systems:  # fail on a bad name here, before any rank starts
        bench.parse_system(s, args.nproc or max(1, _visible_gpus(args.device)) or 1)
    cfg = bench.BenchConfig(model=args.model, systems=systems, batch=args.batch, seq=args.seq, warmup=args.warmup,
                            iters=args.iters, device=args.device, profile=args.profile, commit=args.commit,
                            results=os.path.abspath(args.results) if args.results else None)
    if args.model not in bench.MODELS:
        raise bench.BenchError(f"unknown model {args.model!r}: choose from {', '.join(bench.MODELS)}")
    records = bench.run(cfg, args.nproc)
    if not records:  # a rank other than 0 under torchrun
        return EXIT_OK
    print()
    cpu = bench.on_cpu(records)
    if cpu:
        print(bench.CPU_NOTE + ".")
    print(bench.table(records))
    if args.profile:
        print("where a step's time goes (ms; device kernels by kind, which overlap; busy = any kernel running):")
        print(bench.profile_table(records))
    s = bench.summarize(records)
    if s["ratio"] and not cpu:
        print(f"best autoshard system ({s['best_autoshard']}) = {s['ratio']:.2f}x the best peer ({s['best_peer']})")
    if s["loss_spread"] > bench.loss_tolerance(records):
        print(f"warning: the systems' first-step losses differ by {s['loss_spread']:.2e} (relative), more than "
              f"{bench.loss_tolerance(records):.0e}: they do not all compute the same function", file=sys.stderr)
    if args.results:
        print(f"appended {len(records)} records to {args.results}", file=sys.stderr)
    if args.json:
        print(json.dumps(records, indent=1))
    return EXIT_FAILED if all(r.get("error") for r in records) else EXIT_OK


def _visible_gpus(device: str | None) -> int:
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return 2
    return torch.cuda.device_count()


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

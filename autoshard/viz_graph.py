"""What ``autoshard viz`` and ``autoshard check`` look at: a model sharded on a virtual mesh, and facts about its nodes.

:func:`lower` builds the :class:`~autoshard.api.ShardedModule` on a *virtual* mesh (no processes) and
collects the whole rewritten graph of rank 0's tensor-parallel slice, with the pipeline stage of every
node (with ``pp > 1`` a rank holds only its own stages, so the graph of all stages is lowered once more
from the same plan). The node facts here (op names, placements, local shapes) are what every drawing
and :func:`op_coverage` (``autoshard check``) read.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node
from torch.utils._pytree import tree_map

from autoshard.api import ShardedModule, autoshard
from autoshard.passes.capture import capture
from autoshard.passes.pipeline_split import split_stages
from autoshard.passes.tensor_parallel import TensorParallelPlan, apply_tensor_parallel
from autoshard.runtime import collectives as C
from autoshard.runtime.errors import CaptureError
from autoshard.runtime.mesh import Mesh
from autoshard.runtime.plan import Plan

_COLLECTIVE_MODULE = C.__name__
_KIB = 1024.0


@dataclass
class Lowered:
    """A model sharded on a virtual mesh, and the whole rewritten graph of rank 0's tensor-parallel slice.

    ``graph`` holds every stage (the ranks along ``pp`` together); ``stage_of`` maps a node name to its
    pipeline stage and ``stage_params`` lists the parameters each stage loads (one entry when ``pp == 1``).
    """

    sm: ShardedModule
    model_name: str
    gm: GraphModule
    stage_of: dict[str, int]
    stage_params: list[list[str]]
    inputs: str = ""
    microbatch_note: str = ""

    @property
    def graph(self) -> Graph:
        return self.gm.graph

    @property
    def plan(self) -> Plan:
        return self.sm.plan

    @property
    def tp(self) -> int:
        return self.sm.mesh.size("tp")

    @property
    def pp(self) -> int:
        return self.sm.mesh.size("pp")


def _first_microbatch(args: tuple, kwargs: dict, m: int) -> tuple[tuple, dict]:
    """The first of ``m`` microbatches, cut as the pipeline cuts them (dim 0 of batch-sized tensors)."""
    sizes = [x.shape[0] for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not sizes or m <= 1:
        return args, kwargs
    batch = sizes[0]
    per = batch // m
    return tree_map(lambda x: x[:per] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch else x,
                    (args, kwargs))


def lower(
    model: torch.nn.Module,
    mesh: dict[str, int],
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    loss_fn: Callable | None = None,
    schedule: str = "1f1b",
    microbatches: int | None = None,
    virtual_stages: int = 1,
    progress: Callable[[str], None] | None = None,
    attention: str | None = None,
) -> Lowered:
    """Shard ``model`` on a virtual mesh with the given degrees (rank 0) and collect its rewritten graph.

    ``args``/``kwargs`` are one local batch (a model takes either positional or keyword inputs here,
    as :func:`autoshard.autoshard` does). ``progress`` is told what is being done, for a status line.
    ``attention``: a block-sparse spec, as ``autoshard(attention=...)`` takes; its layout is drawn.
    """
    kwargs = dict(kwargs or {})
    say = progress or (lambda _msg: None)
    say("capturing and planning")
    vmesh = Mesh.virtual(**mesh, rank=0)
    example = kwargs if kwargs else tuple(args)
    sm = autoshard(model, vmesh, example_inputs=example, loss_fn=loss_fn, schedule=schedule,
                   microbatches=microbatches, virtual_stages=virtual_stages, attention=attention)
    plan = sm.plan
    name = type(model).__name__
    if getattr(sm, "fallback", None):  # capture failed and autoshard fell back to the unmodified module
        reason = plan.fallbacks[0]["reason"] if plan.fallbacks else "torch.export failed"
        raise CaptureError(f"there is no graph of {name} to draw or check: {reason}")
    if isinstance(sm.module, GraphModule):
        stage_of = {n.name: 0 for n in sm.module.graph.nodes}
        return Lowered(sm, name, sm.module, stage_of, [list(plan.params)])
    # pp > 1: this rank holds only its stages; lower every stage from the same plan to draw them all
    say("lowering every pipeline stage")
    m = int(plan.pipeline["microbatches"])
    margs, mkwargs = _first_microbatch(tuple(args), kwargs, m)
    gm = capture(model, margs, mkwargs, training=True)
    gm, _ = apply_tensor_parallel(gm, TensorParallelPlan(dict(plan.params), [], []), sm.mesh.size("tp"),
                                  sm.mesh.group("tp").name)
    split = split_stages(gm, sm.schedule.num_stages, plan.pipeline.get("split_points"))
    stage_of: dict[str, int] = {}
    for s, g in enumerate(split.stages):
        for n in g.graph.nodes:
            if n.op not in ("placeholder", "get_attr", "output"):
                stage_of[n.name] = s
    last = split.num_stages - 1
    for n in gm.graph.nodes:
        if n.op == "output":
            stage_of[n.name] = last
        elif n.op == "placeholder":  # drawn in the first stage that reads it
            users = [stage_of[u.name] for u in n.users if u.name in stage_of]
            stage_of[n.name] = min(users, default=0)
    note = f"shapes are those of one microbatch (the local batch cut into {m})"
    return Lowered(sm, name, gm, stage_of, [list(p) for p in split.params], microbatch_note=note)


# ====================================================================================== node facts
def op_name(node: Node) -> str:
    """A readable op name: ``aten.linear``, ``aten.add.Tensor``, ``getitem``, ``autoshard.all_reduce``."""
    t = node.target
    if node.op != "call_function":
        return str(node.op if node.op != "call_module" else t)
    if isinstance(t, torch._ops.OpOverload):
        text = str(t)
        return text[: -len(".default")] if text.endswith(".default") else text
    mod = getattr(t, "__module__", "") or ""
    fn = getattr(t, "__name__", str(t))
    if mod.startswith("autoshard"):
        return f"autoshard.{fn}"
    return fn


def short_op(node: Node) -> str:
    """The op name without namespace or overload: what a node box says first."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._opname if hasattr(t, "_opname") else str(t).split(".")[1]
    return op_name(node).split(".")[-1]


def is_collective(node: Node) -> bool:
    """A collective the tensor-parallel pass inserted (a function of :mod:`autoshard.runtime.collectives`)."""
    return node.op == "call_function" and getattr(node.target, "__module__", "") == _COLLECTIVE_MODULE


def drawn(node: Node) -> bool:
    """Nodes worth drawing: inputs, compute, collectives and the output (not parameter loads or asserts)."""
    if node.op in ("get_attr",):
        return False
    if node.op == "call_module" and str(node.target).startswith("_guards"):
        return False
    if node.op == "call_function" and not node.users and node.meta.get("val") is None:
        return False  # metadata assertions
    return True


def _meta_placement(node: Node) -> str | list[str]:
    p = (node.meta.get("autoshard") or {}).get("placement")
    return p if p is not None else "R"


def _local(shape: list[int], placement: str, tp: int) -> list[int]:
    out = list(shape)
    m = re.fullmatch(r"S\((-?\d+)\)", placement)
    if m and out:
        d = int(m.group(1)) % len(out)
        out[d] //= tp
    return out


def val_shapes(node: Node) -> list[list[int]] | list[int] | None:
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return [int(s) for s in v.shape]
    if isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return [[int(s) for s in t.shape] for t in v]
    return None


def dtype_of(node: Node) -> str:
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)) and v:
        v = v[0]
    return str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else ""


def itemsize(node: Node) -> int:
    v = node.meta.get("val")
    return v.element_size() if isinstance(v, torch.Tensor) else 4


def fmt_bytes(n: float) -> str:
    """``32768`` → ``32.0 KiB``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < _KIB or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= _KIB
    return f"{n:.1f} TiB"  # pragma: no cover


class Facts:
    """Placements and local shapes of the values in a rewritten graph."""

    def __init__(self, low: Lowered) -> None:
        self.low = low
        self.tp = low.tp
        self.alias = {a: n for n, p in low.plan.params.items() for a in [n, *p.aliases]}

    def param(self, node: Node) -> str | None:
        if node.op == "get_attr" and str(node.target) in self.alias:
            return self.alias[str(node.target)]
        return None

    def placement(self, node: Node) -> str | list[str]:
        """Placement of the value ``node`` produces on the tp dimension (``P`` where it feeds an all-reduce)."""
        pname = self.param(node)
        if pname is not None:
            return self.low.plan.params[pname].placement
        if node.op in ("placeholder", "get_attr"):
            return "R"
        p = _meta_placement(node)
        if p == "R" and any(is_collective(u) and u.target is C.all_reduce for u in node.users):
            return "P"  # the partial sums of a row-parallel product, summed by the all-reduce it feeds
        return p

    def local_shape(self, node: Node) -> list[int] | list[list[int]] | None:
        shp = val_shapes(node)
        if shp is None:
            return None
        pl = self.placement(node)
        if shp and isinstance(shp[0], list):
            pls = pl if isinstance(pl, list) else [pl] * len(shp)
            return [_local(s, p, self.tp) for s, p in zip(shp, pls)]
        return _local(shp, pl if isinstance(pl, str) else "R", self.tp)

    def sharded(self, node: Node) -> bool:
        """Whether ``node`` works on shards: its result or one of its tensor inputs is not replicated."""
        vals = [self.placement(node)] + [self.placement(a) for a in node.all_input_nodes]
        flat = [p for v in vals for p in (v if isinstance(v, list) else [v])]
        return any(p != "R" for p in flat)


def value_label(placement: str | list[str], shape: Any) -> str:
    """Edge text: ``S(2) [2,64,96]``; tuples as ``3 × S(2) [2,64,32]`` when their parts agree."""
    def one(p: str, s: list[int] | None) -> str:
        return p + ("" if s is None else " [" + ",".join(str(d) for d in s) + "]")

    if isinstance(placement, list) or (shape and isinstance(shape[0], list)):
        pls = placement if isinstance(placement, list) else [placement] * len(shape or [])
        shapes = shape if shape and isinstance(shape[0], list) else [None] * len(pls)
        parts = [one(p, s) for p, s in zip(pls, shapes)]
        if parts and len(set(parts)) == 1:
            return f"{len(parts)} × {parts[0]}"
        return "(" + ", ".join(parts) + ")"
    return one(placement, shape)


# ====================================================================================== coverage
def op_coverage(low: Lowered) -> dict[str, dict[str, int]]:
    """Per op name: how many nodes run on shards (``sharded``), whole (``replicated``), or fell back.

    Counts the model's ops in the whole rewritten graph (every block, every stage); the inserted
    collectives are not the model's ops and are left out.
    """
    facts = Facts(low)
    fb_nodes = {f["node"] for f in low.plan.fallbacks}
    out: dict[str, dict[str, int]] = {}
    for node in low.graph.nodes:
        if node.op not in ("call_function", "call_module") or not drawn(node) or is_collective(node):
            continue
        row = out.setdefault(op_name(node), {"sharded": 0, "replicated": 0, "fallback": 0})
        if node.name in fb_nodes:
            row["fallback"] += 1
        elif facts.sharded(node):
            row["sharded"] += 1
        else:
            row["replicated"] += 1
    return dict(sorted(out.items(), key=lambda kv: (-sum(kv[1].values()), kv[0])))


def collective_counts(low: Lowered) -> Counter[str]:
    """How many collectives of each kind the rewritten graph holds."""
    return Counter(short_op(n) for n in low.graph.nodes if is_collective(n))



"""Plan: the serialisable record of every parallelisation decision.

A Plan is plain data (JSON-compatible dicts and lists): mesh degrees, the placement of every
parameter on the tensor-parallel dimension, the collectives the rewritten graph performs, the ops
that fell back to replicated execution (with their source lines), the data-parallel gradient
buckets, notes that say why, and estimates. Checkpoints store it; ranks compare its
:attr:`fingerprint` at start-up, so two ranks with different plans fail loudly instead of hanging.

Placements are written as DTensor prints them (``"S(0)"``, ``"R"``) and read back into
:mod:`torch.distributed.tensor` placement types by :meth:`Plan.placement`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from .choices import Choices
from .errors import PlanFileError
from .mesh import DIM_ORDER

PLAN_VERSION = 1


def placement_str(p: Placement) -> str:
    """Canonical text of a placement: ``R``, ``S(d)`` or ``P``."""
    if isinstance(p, Shard):
        return f"S({p.dim})"
    if isinstance(p, Partial):
        return "P"
    return "R"


def parse_placement(text: str) -> Placement:
    m = re.fullmatch(r"S\((-?\d+)\)", text)
    if m:
        return Shard(int(m.group(1)))
    if text == "P":
        return Partial()
    if text == "R":
        return Replicate()
    raise ValueError(f"not a placement: {text!r}")


@dataclass
class ParamPlan:
    shape: list[int]
    placement: str  # on the tp dimension
    local_shape: list[int]
    role: str  # column | row | vocab | replicated
    blocks: int = 1  # >1: the sharded dim is `blocks` equal segments, each split (fused qkv)
    aliases: list[str] = field(default_factory=list)  # other state-dict names of this tensor (tied)


@dataclass
class Plan:
    mesh: dict[str, int]
    params: dict[str, ParamPlan] = field(default_factory=dict)
    buffers: list[str] = field(default_factory=list)
    collectives: list[dict[str, Any]] = field(default_factory=list)
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    dp_buckets: list[list[str]] = field(default_factory=list)
    pipeline: dict[str, Any] = field(default_factory=dict)
    zero: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)  # predicted bytes per rank, term by term
    notes: list[str] = field(default_factory=list)
    estimates: dict[str, float] = field(default_factory=dict)
    experts: dict[str, Any] = field(default_factory=dict)  # ep degree, capacity factor, MoE layers and their experts
    fusions: dict[str, Any] = field(default_factory=dict)  # fused kernel regions and rejected candidates (fuse=True)
    attention: dict[str, Any] = field(default_factory=dict)  # block-sparse layout, replaced/refused sdpa nodes
    checkpointing: dict[str, Any] = field(default_factory=dict)  # activation checkpointing: spec, blocks per stage
    choices: dict[str, Any] = field(default_factory=dict)  # the options asked for (runtime/choices.py), as JSON
    version: int = PLAN_VERSION

    # ------------------------------------------------------------------ queries
    def placement(self, name: str) -> Placement:
        """The tp-dimension placement of parameter ``name`` as a DTensor placement."""
        return parse_placement(self.params[name].placement)

    @property
    def degrees(self) -> dict[str, int]:
        return dict(self.mesh)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fingerprint"] = self.fingerprint
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        """The plan ``to_json`` wrote. Raises :class:`PlanFileError`, naming the key at fault, when the text is
        not JSON, does not follow the plan schema, or its fingerprint is missing or does not match its content."""
        return cls.from_dict(parse_json(text))

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        validate_plan(d)
        fields = {k: v for k, v in d.items() if k != "fingerprint"}
        fields["params"] = {k: ParamPlan(**v) for k, v in d["params"].items()}
        plan = cls(**fields)
        try:
            fp = plan.fingerprint
        except RecursionError:
            raise PlanFileError("not a valid autoshard plan: its values are nested too deeply") from None
        if d["fingerprint"] != fp:
            raise PlanFileError("invalid autoshard plan: fingerprint: the plan fingerprint does not match its "
                                "content: the file was altered or corrupted")
        return plan

    @property
    def fingerprint(self) -> str:
        """sha256 over the decisions (not the estimates or per-rank memory): equal on every rank of one run."""
        d = asdict(self)
        d.pop("estimates")
        d.pop("memory")  # per rank: pipeline stages hold different parameters
        if not d.get("fusions"):
            d.pop("fusions", None)  # plans made without fusion keep the fingerprint they always had
        if not d.get("experts"):
            d.pop("experts", None)  # likewise plans of models without experts
        if not d.get("attention"):
            d.pop("attention", None)  # and plans made without attention=...
        if not d.get("checkpointing"):
            d.pop("checkpointing", None)  # and without activation_checkpointing=...
        if not d.get("choices"):
            d.pop("choices", None)  # and plans written before choices were recorded
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ------------------------------------------------------------------ text
    def summary(self) -> str:
        deg = ", ".join(f"{k}={v}" for k, v in self.mesh.items() if v > 1) or "single device"
        roles = Counter(p.role for p in self.params.values())
        coll = Counter(c["op"] for c in self.collectives)
        return (
            f"plan {self.fingerprint}: {deg}; params "
            + ", ".join(f"{n} {r}" for r, n in sorted(roles.items()))
            + f"; per step: {sum(coll.values())} tp collectives ("
            + ", ".join(f"{n} {op}" for op, n in sorted(coll.items()))
            + f"); {len(self.dp_buckets)} dp buckets; {len(self.fallbacks)} fallbacks"
            + (f"; {len(self.pipeline['stages'])} pipeline stages, {self.pipeline['schedule']}" if self.pipeline else "")
            + (f"; {len(self.fusions.get('regions', []))} fused kernel regions" if self.fusions else "")
            + (f"; {len(self.attention.get('replaced', []))} block-sparse attention nodes" if self.attention else "")
            + (f"; {sum(map(len, self.checkpointing['stages']))} checkpointed blocks" if self.checkpointing else "")
        )

    def explain(self) -> str:
        """A report a person can read: what was decided for each parameter, and why."""
        lines = [self.summary(), ""]
        if self.choices:
            default = {f.name: f.default for f in dataclasses.fields(Choices)}
            asked = [f"{k}={v!r}" for k, v in self.choices.items()
                     if v != (list(default[k]) if isinstance(default.get(k), tuple) else default.get(k))]
            lines += [f"Options asked for: {', '.join(asked) or 'the defaults'}", ""]
        tp = self.mesh.get("tp", 1)
        lines.append(f"Tensor parallel (tp={tp}):")
        if tp == 1:
            lines.append("  tp=1: every parameter is whole on every rank.")
        width = max((len(n) for n in self.params), default=10)
        why = {
            "column": "column-parallel: output features split, feeds a row-parallel or sharded op",
            "row": "row-parallel: input features split, partial sums all-reduced once",
            "vocab": "vocab-parallel embedding: rows split, lookups masked, partial sums all-reduced",
            "replicated": "replicated",
        }
        for name, p in self.params.items():
            extra = f" in {p.blocks} fused segments" if p.blocks > 1 else ""
            tied = f" (tied: {', '.join(p.aliases)})" if p.aliases else ""
            lines.append(
                f"  {name:<{width}}  {str(p.shape):<14} {p.placement:<5} local {str(p.local_shape):<14} "
                f"{why.get(p.role, p.role)}{extra}{tied}"
            )
        if self.collectives:
            lines += ["", "Collectives in the rewritten graph (forward; backward runs the conjugates):"]
            for c in self.collectives:
                lines.append(f"  {c['op']:<11} {c['node']:<28} {c['bytes']:>12,} B   {c.get('where', '')}")
        lines += ["", "Fallbacks (ops run replicated, inputs gathered):"]
        if not self.fallbacks:
            lines.append("  none")
        for f in self.fallbacks:
            lines.append(f"  {f['op']} at {f['node']}: {f['reason']}  [{f.get('source', '?')}]")
        if self.pipeline:
            pl = self.pipeline
            lines += ["", f"Pipeline (pp={self.mesh.get('pp', 1)}): {pl['schedule']} schedule, "
                          f"{pl['microbatches']} microbatches, {pl['virtual_stages']} stage(s) per rank; "
                          f"cuts at {', '.join(pl['split_points'] or []) or '-'}"]
            for st in pl["stages"]:
                blocks = st["blocks"]
                span = f"blocks {blocks[0]}..{blocks[-1]}" if blocks else "by split points"
                lines.append(f"  stage {st['stage']} on pp rank {st['pp_rank']}: {span}, {st['params']} params, "
                             f"{st['flops'] / 1e9:.3f} GFLOP, receives {st['receives']} tensors")
            for name, stages in pl.get("shared_params", {}).items():
                lines.append(f"  {name} is used by stages {stages}: its gradients are summed across them")
        if self.experts:
            ex = self.experts
            cap = "dropless" if ex["capacity_factor"] is None else f"capacity factor {ex['capacity_factor']:g} (GShard)"
            lines += ["", f"Experts (ep={ex['ep']}, {cap}): tokens go to their experts and back by all-to-all "
                          "over ep; expert gradients are averaged over dp, dense ones over dp x ep."]
            for ly in ex["layers"]:
                lines.append(f"  {ly['name']}: {ly['kind']}, {ly['experts']} experts, {ly['experts_per_rank']} per ep "
                             f"rank, top-{ly['top_k'] or '?'}, router {ly['router'] or 'inside the block'}")
        if self.fusions:
            lines += ["", *fusion_lines(self.fusions)]
        if self.attention:
            lines += ["", *attention_lines(self.attention)]
        if self.checkpointing:
            lines += ["", *checkpointing_lines(self.checkpointing)]
        if self.mesh.get("dp", 1) > 1:
            nb = len(self.dp_buckets)
            lines += ["", f"Data parallel (dp={self.mesh['dp']}): gradients averaged in {nb} buckets, "
                          "launched as soon as a bucket's gradients are ready in backward."]
        if self.zero and (self.zero.get("stage") or self.zero.get("precision") != "fp32" or self.zero.get("offload")):
            z = self.zero
            lines += ["", f"Memory manager: ZeRO stage {z['stage']}, {z['precision']} compute copies with fp32 masters"
                          f"{', optimizer offloaded to CPU' if z.get('offload') else ''}"
                          f"{' (its step pipelined per bucket)' if z.get('offload_overlap') else ''}"
                          f"{', gradients clipped to norm ' + str(z['grad_clip']) if z.get('grad_clip') else ''}"]
        if self.memory:
            lines += ["", "Predicted model-state memory per rank (bytes):"]
            for k, v in self.memory.items():
                lines.append(f"  {k}: {v:,}")
        if self.notes:
            lines += ["", "Notes:"] + [f"  - {n}" for n in self.notes]
        if self.estimates:
            lines += ["", "Estimates (per rank):"]
            for k, v in self.estimates.items():
                lines.append(f"  {k}: {v:,.0f}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plan files
# Plans read from files (and from other ranks) are checked against an explicit schema before any field
# is used, so that a bad file is one PlanFileError naming the key at fault, never a crash later on.
class Schema:
    """Small checks of JSON values; each failure names the key path (e.g. ``params['w'].placement``)."""

    @staticmethod
    def fail(key: str, problem: str) -> None:
        raise PlanFileError(f"invalid autoshard plan: {key}: {problem}")

    @classmethod
    def obj(cls, v: Any, key: str) -> dict:
        if not isinstance(v, dict):
            cls.fail(key, f"expected a JSON object, got {_kind(v)}")
        return v

    @classmethod
    def keys(cls, d: dict, key: str, required: tuple[str, ...], optional: tuple[str, ...] = (),
             allow_unknown: bool = False) -> None:
        for k in required:
            if k not in d:
                cls.fail(_sub(key, k), "missing")
        if not allow_unknown:
            unknown = sorted(k for k in d if k not in required and k not in optional)
            if unknown:
                cls.fail(_sub(key, unknown[0]), "unknown key")

    @classmethod
    def int_(cls, v: Any, key: str, minimum: int | None = None, maximum: int | None = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            cls.fail(key, f"expected an integer, got {_kind(v)}")
        if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            cls.fail(key, f"expected an integer {bound}, got {v}")
        return v

    @classmethod
    def number(cls, v: Any, key: str, minimum: float | None = None) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            cls.fail(key, f"expected a number, got {_kind(v)}")
        if minimum is not None and v < minimum:
            cls.fail(key, f"expected a number >= {minimum}, got {v}")
        return v

    @classmethod
    def str_(cls, v: Any, key: str, choices: tuple | None = None) -> str:
        if not isinstance(v, str):
            cls.fail(key, f"expected a string, got {_kind(v)}")
        if choices is not None and v not in choices:
            cls.fail(key, f"expected one of {', '.join(map(repr, choices))}, got {v!r}")
        return v

    @classmethod
    def list_(cls, v: Any, key: str, item: Any = None) -> list:
        if not isinstance(v, list):
            cls.fail(key, f"expected a JSON array, got {_kind(v)}")
        if item is not None:
            for i, x in enumerate(v):
                item(x, f"{key}[{i}]")
        return v

    @classmethod
    def map_(cls, v: Any, key: str, value: Any = None) -> dict:
        cls.obj(v, key)
        if value is not None:
            for k, x in v.items():
                value(x, _sub(key, k))
        return v


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    text = repr(v) if isinstance(v, (bool, int, float, str)) else ""
    text = text if len(text) <= 40 else text[:37] + "..."
    return names.get(type(v), type(v).__name__) + (f" {text}" if text else "")


def _sub(key: str, k: str) -> str:
    plain = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)
    return (f"{key}.{k}" if key else k) if plain else f"{key}[{k!r}]"


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` for files of plans: malformed or too deeply nested text is a :class:`PlanFileError`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanFileError(f"not an autoshard plan: not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") \
            from None
    except RecursionError:
        raise PlanFileError("not an autoshard plan: the JSON is nested too deeply") from None
    except (UnicodeDecodeError, TypeError) as e:
        raise PlanFileError(f"not an autoshard plan: not JSON text ({e})") from None


_PLACEMENT = re.compile(r"R|P|S\((-?\d+)\)")


def check_placement(v: Any, key: str, ndim: int | None = None) -> str:
    """A placement as plans write it: ``R`` (replicate), ``P`` (partial sum) or ``S(d)`` (shard dim d)."""
    Schema.str_(v, key)
    m = _PLACEMENT.fullmatch(v)
    if m is None:
        Schema.fail(key, f"not a placement: {v!r} (expected R, P or S(dim))")
    if m.group(1) is not None and ndim is not None and not -ndim <= int(m.group(1)) < max(ndim, 1):
        Schema.fail(key, f"{v} shards dim {m.group(1)} of a {ndim}-dim tensor")
    return v


def check_mesh(v: Any, key: str = "mesh", dims: tuple[str, ...] = DIM_ORDER, require_all: bool = False) -> dict:
    """A mesh: an object of dimension name (one of ``dims``) to a degree >= 1."""
    Schema.obj(v, key)
    for k, n in v.items():
        if k not in dims:
            Schema.fail(_sub(key, k), f"unknown mesh dimension (expected {', '.join(dims)})")
        Schema.int_(n, _sub(key, k), minimum=1)
    if require_all:
        Schema.keys(v, key, dims)
    return v


def _str_list(v: Any, key: str) -> None:
    Schema.list_(v, key, Schema.str_)


def _param(v: Any, key: str) -> None:
    Schema.obj(v, key)
    Schema.keys(v, key, ("shape", "placement", "local_shape", "role"), ("blocks", "aliases"))
    shape = Schema.list_(v["shape"], _sub(key, "shape"), lambda x, k: Schema.int_(x, k, minimum=0))
    local = Schema.list_(v["local_shape"], _sub(key, "local_shape"), lambda x, k: Schema.int_(x, k, minimum=0))
    if len(local) != len(shape):
        Schema.fail(_sub(key, "local_shape"), f"has {len(local)} dims, shape has {len(shape)}")
    check_placement(v["placement"], _sub(key, "placement"), len(shape))
    Schema.str_(v["role"], _sub(key, "role"))
    if "blocks" in v:
        Schema.int_(v["blocks"], _sub(key, "blocks"), minimum=1)
    if "aliases" in v:
        _str_list(v["aliases"], _sub(key, "aliases"))


def _collective(v: Any, key: str) -> None:
    Schema.obj(v, key)
    Schema.keys(v, key, ("op",), allow_unknown=True)
    Schema.str_(v["op"], _sub(key, "op"))


def _pipeline(v: Any, key: str) -> None:
    Schema.obj(v, key)
    if v:  # summary() and explain() read these
        Schema.keys(v, key, ("stages", "schedule"), allow_unknown=True)
        Schema.list_(v["stages"], _sub(key, "stages"), Schema.obj)
        Schema.str_(v["schedule"], _sub(key, "schedule"))


def _checkpointing(v: Any, key: str) -> None:
    Schema.obj(v, key)
    if v:
        Schema.keys(v, key, ("stages",), allow_unknown=True)
        Schema.list_(v["stages"], _sub(key, "stages"), _str_list)


_PLAN_OPTIONAL = {
    "buffers": _str_list,
    "collectives": lambda v, k: Schema.list_(v, k, _collective),
    "fallbacks": lambda v, k: Schema.list_(v, k, Schema.obj),
    "dp_buckets": lambda v, k: Schema.list_(v, k, _str_list),
    "pipeline": _pipeline,
    "zero": Schema.obj,
    "memory": lambda v, k: Schema.map_(v, k, Schema.number),
    "notes": _str_list,
    "estimates": lambda v, k: Schema.map_(v, k, Schema.number),
    "experts": Schema.obj,
    "fusions": Schema.obj,
    "attention": Schema.obj,
    "checkpointing": _checkpointing,
    "choices": Schema.obj,
}


def validate_plan(d: Any) -> None:
    """Check the JSON object of a :class:`Plan` against its schema; raise :class:`PlanFileError` naming the key."""
    if not isinstance(d, dict) or "mesh" not in d:
        raise PlanFileError("not an autoshard plan: expected a JSON object with a 'mesh' key")
    if d.get("version") != PLAN_VERSION:
        raise PlanFileError(f"invalid autoshard plan: version: plan version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")
    Schema.keys(d, "", ("mesh", "params", "version", "fingerprint"), tuple(_PLAN_OPTIONAL))
    check_mesh(d["mesh"])
    Schema.map_(d["params"], "params", _param)
    Schema.str_(d["fingerprint"], "fingerprint")
    for k, check in _PLAN_OPTIONAL.items():
        if k in d:
            check(d[k], k)


def fusion_lines(fusions: dict[str, Any]) -> list[str]:
    """The fusion section of :meth:`Plan.explain`: every fused region, then each candidate left alone and why."""
    regions, rejected = fusions.get("regions", []), fusions.get("rejected", [])
    kinds = Counter(r["kind"] for r in regions)
    lines = [f"Fused kernels: {len(regions)} regions (" + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
             + f"), replacing {sum(len(r['ops']) for r in regions)} aten ops:"]
    for r in regions:
        ops = Counter(op.removeprefix("aten.") for op in r["ops"])
        lines.append(f"  {r['node']:<24} {r['kind']:<18} {r['kernel']:<28} "
                     + " ".join(f"{op}×{n}" if n > 1 else op for op, n in ops.items())
                     + f"   {r.get('module') or '-'} [{r.get('source', '?')}]")
    lines.append(f"Not fused ({len(rejected)}):" if rejected else "Not fused: none")
    for r in rejected:
        lines.append(f"  {r['node']:<24} {r['op']:<26} {r['reason']}   [{r.get('source', '?')}]")
    return lines


def checkpointing_lines(ck: dict[str, Any]) -> list[str]:
    """The activation checkpointing section of :meth:`Plan.explain`: the blocks of each stage, what reruns."""
    stages = ck.get("stages", [])
    lines = [f"Activation checkpointing ({ck.get('spec')!r}): {sum(map(len, stages))} blocks keep only their inputs "
             "for backward and run their forward again when backward reaches them (same RNG state, so dropout "
             "masks repeat; the collectives inside rerun in the forward's order on every rank)."]
    for s, names in enumerate(stages):
        where = f"stage {s}" if len(stages) > 1 else "blocks"
        lines.append(f"  {where}: {', '.join(names) if names else 'none'}")
    for b in ck.get("blocks", []):
        coll = ", ".join(b["recomputed_collectives"]) or "none"
        lines.append(f"  {b['block']:<20} {b['node']:<28} {b['ops']} ops, {b['inputs']} activations and "
                     f"{b['params']} parameters in, {b['outputs']} out; collective nodes rerun: {coll}")
    return lines


def attention_lines(attention: dict[str, Any]) -> list[str]:
    """The block-sparse attention section of :meth:`Plan.explain`: layout, replaced nodes, refusals, block grid."""
    replaced, rejected = attention.get("replaced", []), attention.get("rejected", [])
    lines = [f"Block-sparse attention {attention.get('spec', '?')}: {len(replaced)} sdpa nodes replaced:"]
    for r in replaced:
        lines.append(f"  {r['node']:<24} {'causal' if r['causal'] else 'bidirectional':<13} {r['blocks']} blocks, "
                     f"{r['nnz_blocks']} visited, density {r['density']:.3f}   {r.get('module') or '-'} "
                     f"[{r.get('source', '?')}]")
    lines.append(f"Left dense ({len(rejected)}):" if rejected else "Left dense: none")
    for r in rejected:
        lines.append(f"  {r['node']:<24} {r['reason']}   [{r.get('source', '?')}]")
    grid = attention.get("grid") or []
    if grid:
        lines.append("Layout (query blocks down, key blocks across; # visited):")
        lines += [f"  {row}" for row in grid]
    return lines

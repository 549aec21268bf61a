"""Activation checkpointing pass: chosen repeated blocks keep only their inputs for backward.

Problem. Autograd keeps, for every block of a transformer, the activations its backward needs
(about ``A_blk`` bytes per sequence). Checkpointing a block keeps only its inputs (``X_blk``) and
runs its forward again when backward reaches it, so at most one block's activations are alive
during the recompute. The planner chooses how many blocks (``k`` per pipeline rank; see
``passes/cost_model.py``); this pass makes the graph do it.

Method. Blocks are the children of the module list with the most indexed children, read from
``nn_module_stack`` (:func:`autoshard.passes.pipeline_split.find_blocks`, the same blocks that stage
cuts and ZeRO-3 buckets use). A block's *region* is the contiguous run of call nodes from its first
to its last node; nodes inside it with no module of their own (collectives the tensor-parallel pass
inserted) belong to it, and a node of another block inside it is an error. The region becomes a
sub-``GraphModule`` whose placeholders are the region's inputs (activations, and the parameters as
values: the sub-module owns no state, so parameter binding, ZeRO-3 flat-buffer views and pipeline
stages are unaffected), and the outer graph calls it once::

    %ckpt_blocks_1 = get_attr[target=ckpt_blocks_1]
    %checkpoint_blocks_1 = call_function[target=autoshard.runtime.recompute.checkpoint_block](
        args = (%ckpt_blocks_1, %add_2, %blocks_1_ln1_weight, ...))
    %blocks_1_out = call_function[target=operator.getitem](args = (%checkpoint_blocks_1, 0))

``print(gm.ckpt_blocks_1.graph)`` shows the block itself. The call node carries the block's
``nn_module_stack``, so later passes (ZeRO-3 gathers, gradient-ready order) still see the block:
ZeRO-3 gathers the bucket before the call, releases it after, and puts ``regather`` on the call's
outputs, whose backward gathers the bucket again before the recompute reads the parameters.

Refused (``PlanError``): a region that writes in place to a tensor made outside it (a buffer update
such as a call counter or running statistics would be applied twice; in-place ops on the region's
own intermediates are fine, the recompute makes them afresh), a ``call_module`` node inside a
region, and blocks that interleave.
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from autoshard.runtime.errors import PlanError
from autoshard.runtime.recompute import checkpoint_block

from .memory import VIEW_OPS, saved_activation_bytes
from .pipeline_split import _block_of, find_blocks

__all__ = ["parse_spec", "choose_blocks", "blocks_in", "checkpoint_blocks", "recompute_bytes", "find_blocks"]


def parse_spec(spec: Any) -> None | str | int | list[str]:
    """``activation_checkpointing=`` checked before capture: ``None``, ``"all"``, an int ``k >= 0`` or
    a non-empty list of block names. Anything else is a :class:`PlanError` that says what to pass."""
    fix = ("pass None (off), 'all', an int k (the first k blocks of each pipeline rank) or a list of block "
           "names such as ['model.layers.0', 'model.layers.1']")
    if spec is None or spec == "all":
        return spec
    if isinstance(spec, bool):
        raise PlanError(f"activation_checkpointing={spec!r}: {fix} ('all' for every block)")
    if isinstance(spec, int):
        if spec < 0:
            raise PlanError(f"activation_checkpointing={spec}: a block count cannot be negative; {fix}")
        return spec or None
    if isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(s, str) and s for s in spec):
            raise PlanError(f"activation_checkpointing={spec!r}: {fix}")
        if len(set(spec)) != len(spec):
            raise PlanError(f"activation_checkpointing={spec!r} names a block twice; name each block once")
        return list(spec)
    raise PlanError(f"activation_checkpointing={spec!r}: {fix}")


def blocks_in(gm: GraphModule, prefix: str) -> list[int]:
    """Indices of the blocks ``gm``'s nodes belong to, in the order the graph runs them."""
    out: list[int] = []
    for node in gm.graph.nodes:
        b = _block_of(node, prefix) if node.op == "call_function" else None
        if b is not None and b not in out:
            out.append(b)
    return out


def choose_blocks(spec: None | str | int | list[str], prefix: str, num_blocks: int,
                  stage_blocks: list[list[int]], stage_rank: list[int]) -> list[list[int]]:
    """The blocks each stage checkpoints: every block (``"all"``), the first ``k`` of each pipeline rank
    (over its stages in order), or the named ones. ``stage_blocks[s]``: blocks in stage ``s``;
    ``stage_rank[s]``: the pipeline rank running it. Bad names or counts raise :class:`PlanError`."""
    if spec is None:
        return [[] for _ in stage_blocks]
    if not num_blocks:
        raise PlanError(f"activation_checkpointing={spec!r}: the model has no repeated blocks (a module list of "
                        "layers) to checkpoint; pass None")
    names = [f"{prefix}.{i}" for i in range(num_blocks)]
    if spec == "all":
        chosen = set(range(num_blocks))
    elif isinstance(spec, int):
        if spec > num_blocks:
            raise PlanError(f"activation_checkpointing={spec}, but the model has {num_blocks} blocks "
                            f"({names[0]} .. {names[-1]}): use an int <= {num_blocks}, or 'all'")
        chosen = set()
        for r in sorted(set(stage_rank)):
            mine: list[int] = []
            for s, blocks in enumerate(stage_blocks):
                if stage_rank[s] == r:
                    mine += [b for b in blocks if b not in mine]
            chosen.update(mine[:spec])
    else:
        unknown = [n for n in spec if n not in names]
        if unknown:
            raise PlanError(f"activation_checkpointing names {unknown}, which are not blocks of this model; its "
                            f"blocks are {names[0]} .. {names[-1]} ({num_blocks})")
        chosen = {names.index(n) for n in spec}
    return [[b for b in blocks if b in chosen] for blocks in stage_blocks]


def _block_stack(node: Node, prefix: str, block: int) -> dict:
    """``nn_module_stack`` cut after the block's own entry (the call node stands for the whole block)."""
    out = {}
    for key, value in (node.meta.get("nn_module_stack") or {}).items():
        out[key] = value
        if str(value[0]) == f"{prefix}.{block}":
            break
    return out


def _mutated_outside(node: Node, inside: set[Node]) -> Node | None:
    """The tensor from outside the region (an input, a buffer, a parameter) that ``node`` writes in place,
    following views back to their base; None when it writes nothing or only a tensor made in the region,
    which the recompute makes afresh."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return None
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        t = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        while isinstance(t, Node) and t in inside and t.target in VIEW_OPS and t.args:
            t = t.args[0]
        if isinstance(t, Node) and t not in inside:
            return t
    return None


def checkpoint_blocks(gm: GraphModule, blocks: list[int], prefix: str) -> list[dict]:
    """Rewrite ``gm`` in place: each block in ``blocks`` runs through :func:`checkpoint_block`.

    Returns one record per block: its name, the call node, how many activations and parameters it
    takes, its outputs, its op count and the collectives that run again in the recompute.
    """
    if not blocks:
        return []
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    owner = {n: _block_of(n, prefix) for n in nodes if n.op == "call_function"}
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    records = []
    for b in blocks:
        mine = [n for n, ob in owner.items() if ob == b]
        if not mine:
            continue
        lo, hi = min(pos[n] for n in mine), max(pos[n] for n in mine)
        region = [n for n in nodes[lo:hi + 1] if n.op != "get_attr"]
        name = f"{prefix}.{b}"
        for n in region:
            other = owner.get(n)
            if n.op != "call_function" or (other is not None and other != b):
                what = f"{n.op} {n.target}" if n.op != "call_function" else f"a node of {prefix}.{other}"
                raise PlanError(f"cannot checkpoint {name}: its nodes are interleaved with {what} ({n.name}); "
                                f"leave {name} out of activation_checkpointing")
        inside = set(region)
        for n in region:
            written = _mutated_outside(n, inside)
            if written is not None:
                raise PlanError(f"cannot checkpoint {name}: {n.name} ({n.target}) changes {written.name}, made outside "
                                "the block, in place, which the recompute would do twice; leave "
                                f"{name} out of activation_checkpointing")
        inputs: list[Node] = []
        for n in region:
            for a in n.all_input_nodes:
                if a not in inside and a not in inputs:
                    inputs.append(a)
        outputs = [n for n in region if any(u not in inside for u in n.users)]
        sub = Graph()
        env: dict[Node, Node] = {}
        for a in inputs:
            ph = sub.placeholder(a.name)
            ph.meta = {k: v for k, v in a.meta.items() if k in ("val", "tensor_meta", "autoshard")}
            if a.op == "get_attr" and a.target in params:
                ph.meta["autoshard_param"] = a.target  # a parameter passed as a value (passes/memory.py)
            env[a] = ph
        for n in region:
            env[n] = sub.node_copy(n, lambda a, env=env: env[a])
        sub.output(tuple(env[o] for o in outputs))
        attr = "ckpt_" + re.sub(r"\W", "_", name)
        gm.add_submodule(attr, GraphModule(torch.nn.Module(), sub, class_name="CheckpointedBlock"))
        stack = _block_stack(mine[0], prefix, b)
        last = nodes[hi]
        with gm.graph.inserting_after(last):
            mod = gm.graph.get_attr(attr)
        with gm.graph.inserting_after(mod):
            call = gm.graph.create_node("call_function", checkpoint_block, (mod, *inputs),
                                        name="checkpoint_" + re.sub(r"\W", "_", name))
        call.meta = {"val": tuple(o.meta.get("val") for o in outputs), "nn_module_stack": stack}
        cur = call
        for i, o in enumerate(outputs):
            with gm.graph.inserting_after(cur):
                cur = gm.graph.create_node("call_function", operator.getitem, (call, i),
                                           name=f"{call.name}_out{i if len(outputs) > 1 else ''}")
            cur.meta = {k: v for k, v in o.meta.items() if k in ("val", "tensor_meta", "autoshard")}
            cur.meta["nn_module_stack"] = stack
            o.replace_all_uses_with(cur, delete_user_cb=lambda u, inside=inside: u not in inside)
        for n in reversed(region):
            gm.graph.erase_node(n)
        collectives = [n.name for n in region if getattr(n.target, "__module__", "").endswith("collectives")
                       or "moe" in getattr(n.target, "__module__", "")]
        records.append({"block": name, "node": call.name, "module": attr, "ops": len(region),
                        "inputs": sum(1 for a in inputs if a.meta.get("val") is not None and not
                                      (a.op == "get_attr" and a.target in params)),
                        "params": sum(1 for a in inputs if a.op == "get_attr" and a.target in params),
                        "outputs": len(outputs), "recomputed_collectives": collectives})
        nodes = list(gm.graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
    gm.graph.lint()
    gm.recompile()
    return records


def recompute_bytes(gm: GraphModule, params: set[str], tp: int = 1) -> int:
    """The most activation bytes one checkpointed block of ``gm`` holds while it is recomputed."""
    best = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is checkpoint_block:
            sub = getattr(gm, node.args[0].target)
            r = saved_activation_bytes(sub, params, tp)
            best = max(best, r["saved"])
    return best

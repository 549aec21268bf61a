"""Joint capture: one rank's forward, loss and backward as one aten graph (AOTAutograd joint export).

The rank's rewritten forward graph (after the tensor-parallel and expert passes) and the user's loss
are wrapped in one module that returns the scalar loss; :func:`export_joint` traces it with
``torch._functorch.aot_autograd.aot_export_joint_with_descriptors``. The result is a functional
graph whose placeholders are the parameters, the buffers, the flattened user inputs and the tangent
of the loss, and whose outputs are the loss and one gradient per parameter. Every input and output
carries a descriptor (``ParamAOTInput(target=...)``, ``GradAOTOutput(grad_of=...)``), which is how
the gradient of each parameter is found by name, not by position.

Backward is no longer walked by eager autograd: it is nodes in this graph, so the optimizer pass
(passes/optimizer.py) can append the update and the runtime (runtime/program.py) can run the whole
step as one program: compiled by Inductor on GPUs, as an FX module on CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils._pytree import tree_flatten

from autoshard.runtime.errors import CaptureError


class LossModule(torch.nn.Module):
    """``forward(args, kwargs, target) -> loss`` over a rank's forward graph and the user's loss.

    ``loss`` is ``loss(output, target) -> scalar tensor`` (the model's own loss when the user gave no
    ``loss_fn``). The forward graph is registered as ``forward_graph``, so parameter names in the
    joint graph are ``forward_graph.<model name>``.
    """

    def __init__(self, forward_graph: torch.nn.Module, loss: Callable[[Any, Any], torch.Tensor]) -> None:
        super().__init__()
        self.forward_graph = forward_graph
        self._loss = loss

    def forward(self, args: tuple, kwargs: dict, target: Any) -> torch.Tensor:
        loss = self._loss(run_keeping_meta(self.forward_graph, args, kwargs), target)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"the loss must be a scalar, got shape {shape}")
        return loss


PREFIX = "forward_graph."


class _MetaInterpreter(torch.fx.Interpreter):
    """Runs a forward graph node by node so that tracing it copies each node's metadata (its module
    stack; the recompute tags of checkpointed blocks) onto the aten nodes it produces.

    A ``checkpoint_block`` call (passes/activation_checkpoint.py) is not run through
    ``torch.utils.checkpoint``: its block is run inline with every node tagged
    ``CheckpointPolicy.MUST_RECOMPUTE`` and one ``ac_graph_id`` per block, which is how AOTAutograd's
    partitioner (``rematerialize``) is told to keep only the block's inputs and recompute the rest in
    the backward part of the graph. Random ops stay untagged: the partitioner saves their outputs, so
    a recompute never draws new random numbers.
    """

    def __init__(self, gm: GraphModule, block_ids: list[int]) -> None:
        super().__init__(gm)
        self._block_ids = block_ids

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        from autoshard.runtime.recompute import checkpoint_block

        if target is checkpoint_block:
            block, *inputs = args
            self._block_ids[0] += 1
            _tag_recompute(block, self._block_ids[0])
            return _MetaInterpreter(block, self._block_ids).run(*inputs, enable_io_processing=False)
        return super().call_function(target, args, kwargs)


def _tag_recompute(block: GraphModule, graph_id: int) -> None:
    from torch.utils.checkpoint import CheckpointPolicy

    for n in block.graph.nodes:
        if n.op != "call_function":
            continue
        if isinstance(n.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in n.target.tags:
            continue
        n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        n.meta["ac_graph_id"] = graph_id


def run_keeping_meta(forward_graph: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """``forward_graph(*args, **kwargs)``, run so that a trace of it keeps each node's metadata (see
    :class:`_MetaInterpreter`). A module that is not an FX graph is simply called."""
    import torch.fx.traceback as fx_traceback

    if not isinstance(forward_graph, GraphModule):
        return forward_graph(*args, **kwargs)
    codegen = forward_graph.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        from torch.fx._pytree import tree_flatten_spec

        flat = tree_flatten_spec((args, kwargs), info.in_spec)
    elif kwargs:
        return forward_graph(*args, **kwargs)
    else:
        flat = list(args)
    with fx_traceback.preserve_node_meta():
        out = _MetaInterpreter(forward_graph, [0]).run(*flat, enable_io_processing=False)
    return forward_graph.graph.process_outputs(out)


@dataclass
class JointGraph:
    """A forward+backward graph and what each of its placeholders and outputs is.

    ``gm([*params, *buffers, *inputs], [tangent])`` returns ``((loss,), grads)``; the gradient of
    ``params[i]`` is ``grads[self.grads[i]]`` (``self.grads[i] is None`` where a parameter gets none).
    """

    gm: GraphModule
    params: list[str]  # model names, in placeholder order
    buffers: list[str]
    num_inputs: int  # flattened (args, kwargs, target) tensors and scalars
    grads: list[int | None]  # for params[i]: the index of its gradient in the graph's grads, or None
    input_spec: Any  # pytree spec of (args, kwargs, target)
    loss_dtype: torch.dtype = torch.float32

    def flat_inputs(self, args: tuple, kwargs: dict, target: Any) -> list:
        leaves, spec = tree_flatten((args, kwargs, target))
        if str(spec) != str(self.input_spec):
            raise ValueError("the inputs do not have the structure the program was captured with")
        return leaves


def export_joint(module: LossModule, args: tuple, kwargs: dict, target: Any) -> JointGraph:
    """Trace ``module(args, kwargs, target)`` and its backward into one graph (see module docstring).

    Raises :class:`CaptureError` when AOTAutograd cannot trace it, or when the step mutates a buffer
    (batch-norm statistics): such programs keep the interpreted executor for now.
    """
    from torch._functorch.aot_autograd import aot_export_joint_with_descriptors

    try:
        with contextlib.ExitStack() as stack:
            jd = aot_export_joint_with_descriptors(stack, module, (args, kwargs, target))
    except Exception as e:  # noqa: BLE001 - re-raised with context
        text = f"{type(e).__name__}: {e}".strip()
        raise CaptureError(f"the joint forward+backward graph could not be traced: {text[:1500]}") from e
    gm = jd.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params: list[str] = []
    buffers: list[str] = []
    inputs = 0
    tangents = 0
    for n in placeholders:
        desc = n.meta.get("desc")
        kind = type(desc).__name__
        if kind == "ParamAOTInput":
            params.append(_strip(desc.target))
        elif kind == "BufferAOTInput":
            buffers.append(_strip(desc.target))
        elif kind == "PlainAOTInput":
            inputs += 1
        elif kind == "TangentAOTInput":
            tangents += 1
        else:
            raise CaptureError(f"joint graph input {n.name} of an unsupported kind: {desc!r}")
    if tangents != 1:
        raise CaptureError(f"the joint graph has {tangents} tangents; a training step has one (the loss)")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    descs = out.meta.get("desc") or []
    index: dict[str, int] = {}
    for i, d in enumerate(descs):
        kind = type(d).__name__
        if d is None or kind == "PlainAOTOutput":
            continue
        if kind == "GradAOTOutput" and type(d.grad_of).__name__ == "ParamAOTInput":
            index[_strip(d.grad_of.target)] = i - 1  # after the one forward output
            continue
        if kind == "GradAOTOutput":
            continue  # gradients of inputs: not needed
        raise CaptureError(f"the training step {_describe(d)}; the joint executor does not run it yet")
    if not descs or type(descs[0]).__name__ != "PlainAOTOutput" or sum(
            type(d).__name__ == "PlainAOTOutput" for d in descs) != 1:
        raise CaptureError("the joint graph must return exactly one forward output, the loss")
    val = getattr(out.args[0][0], "meta", {}).get("val")
    return JointGraph(gm=gm, params=params, buffers=buffers, num_inputs=inputs,
                      grads=[index.get(p) for p in params], input_spec=tree_flatten((args, kwargs, target))[1],
                      loss_dtype=val.dtype if isinstance(val, torch.Tensor) else torch.float32)


def _strip(target: str) -> str:
    return target[len(PREFIX):] if target.startswith(PREFIX) else target


def _describe(desc: Any) -> str:
    kind = type(desc).__name__
    if "Mutation" in kind:
        return f"mutates an input or buffer ({desc!r}), e.g. batch-norm running statistics"
    return f"has an output of an unsupported kind ({desc!r})"


def inline(src: GraphModule, graph: torch.fx.Graph, root: torch.nn.Module, env: dict, tag: str) -> list:
    """Copy ``src``'s nodes (not its placeholders, which ``env`` maps) into ``graph``; return its output
    arguments as ``src``'s own nodes (``env`` maps them to the copies).

    Attributes read by ``get_attr`` move to ``root`` as ``{tag}_{name}``, so graphs inlined side by side
    never clash. The one way the step program's passes join graphs (rematerialize, the optimizer pass).
    """
    out: list = []
    for n in src.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            out = list(n.args[0]) if isinstance(n.args[0], (list, tuple)) else [n.args[0]]
            continue
        new = graph.node_copy(n, lambda a: env[a])
        if n.op == "get_attr":
            obj = src
            for part in n.target.split("."):
                obj = getattr(obj, part)
            new.target = f"{tag}_{n.target.replace('.', '_')}"
            if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter):
                root.register_buffer(new.target, obj)
            else:
                setattr(root, new.target, obj)
        env[n] = new
    return out


def rematerialize(joint: JointGraph) -> tuple[JointGraph, dict[str, Any]]:
    """The joint graph with the backward recomputing what is cheaper to recompute than to keep.

    AOTAutograd's min-cut partitioner (the one ``torch.compile`` uses) splits the joint graph into a
    forward that saves a minimal set of tensors and a backward that recomputes the rest (norm outputs,
    casts, activations of pointwise chains) from them; the two are joined again here into one graph
    of the same signature, so the step program keeps one graph while its activation memory matches
    what a compiled model saves. Returns the graph and a report (tensors saved for backward); a graph
    the partitioner cannot split is returned unchanged, with the reason in the report.
    """
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    placeholders = [n for n in joint.gm.graph.nodes if n.op == "placeholder"]
    joint_out = next(n for n in joint.gm.graph.nodes if n.op == "output").args[0]
    try:
        fw, bw = min_cut_rematerialization_partition(joint.gm, [n.meta.get("val") for n in placeholders],
                                                     num_fwd_outputs=1)
    except Exception as e:  # noqa: BLE001 - the unpartitioned graph is still exact
        return joint, {"rematerialized": False, "reason": f"{type(e).__name__}: {e}"[:300]}
    bw_out = next(n for n in bw.graph.nodes if n.op == "output").args[0]
    if len(bw_out) != len(joint_out) - 1:
        return joint, {"rematerialized": False, "reason": "the backward's outputs do not match the joint graph's"}
    graph = torch.fx.Graph()
    root = torch.nn.Module()
    by_name: dict[str, torch.fx.Node] = {}
    for p in placeholders:
        q = graph.placeholder(p.name)
        q.meta = dict(p.meta)
        by_name[p.name] = q

    fw_env = {n: by_name[n.name] for n in fw.graph.nodes if n.op == "placeholder"}
    fw_out = inline(fw, graph, root, fw_env, "fw")
    bw_env = {}
    for n in bw.graph.nodes:
        if n.op == "placeholder":
            src = next((x for x in fw_out[1:] if isinstance(x, torch.fx.Node) and x.name == n.name), None)
            bw_env[n] = fw_env[src] if src is not None else by_name[n.name]
    bw_out = inline(bw, graph, root, bw_env, "bw")
    loss = fw_env[fw_out[0]]
    graph.output([loss, *[bw_env[g] if isinstance(g, torch.fx.Node) else g for g in bw_out]])
    graph.lint()
    gm = GraphModule(root, graph)
    saved = [x.meta.get("val") for x in fw_out[1:] if isinstance(x, torch.fx.Node)]
    report = {"rematerialized": True, "saved_for_backward": len(fw_out) - 1,
              "saved_bytes": sum(v.numel() * v.element_size() for v in saved if isinstance(v, torch.Tensor)),
              "nodes_before": len(joint.gm.graph.nodes), "nodes_after": len(gm.graph.nodes)}
    return JointGraph(gm=gm, params=joint.params, buffers=joint.buffers, num_inputs=joint.num_inputs,
                      grads=joint.grads, input_spec=joint.input_spec, loss_dtype=joint.loss_dtype), report

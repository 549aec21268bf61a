"""``torch.compile(model, backend=autoshard.backend(mesh))``: tensor- and data-parallel compute for code
that already uses ``torch.compile``, with the user's own training loop and optimizer.

What it shards: compute and activations. Each graph Dynamo hands over is traced to aten ops
(``make_fx``, pre-dispatch, fake tensors), planned and rewritten by the same tensor-parallel pass as
``autoshard(model, mesh)`` (column/row linears, head-sharded attention, vocab-parallel embedding);
every sharded parameter is sliced *inside* the graph by :func:`autoshard.runtime.tp_ops.shard_param`,
whose backward all-gathers the gradient pieces, so the full gradient lands on the user's parameter.
Gradients are averaged over ``dp`` by a hook on each parameter when its gradient is final.

What it cannot shard: parameter, gradient and optimizer-state memory. The user's optimizer holds
whole tensors on every rank; use ``autoshard.autoshard(model, mesh, zero=...)`` to cut those.

Each rank passes its slice of the global batch (ranks differing only in ``tp`` pass the same one).
The loss a rank computes is the loss of its slice; parameters after ``optimizer.step()`` equal
single-device training on the global batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx import GraphModule

from autoshard.passes.tensor_parallel import apply_tensor_parallel, plan_tensor_parallel
from autoshard.runtime import collectives as C
from autoshard.runtime import tp_ops
from autoshard.runtime.mesh import DIM_ORDER, Mesh
from autoshard.runtime.plan import parse_placement

_default_mesh: list[Mesh] = []


class Backend:
    """A ``torch.compile`` backend bound to one mesh (see the module docstring)."""

    def __init__(self, mesh: Mesh) -> None:
        if mesh.size("pp") > 1 or mesh.size("ep") > 1:
            raise ValueError("the torch.compile backend shards over dp and tp; for pp and ep use "
                             "autoshard.autoshard(model, mesh)")
        self.mesh = mesh
        self._hooked: set[int] = set()
        self.plans: list = []  # the tensor-parallel plan of every graph compiled so far
        if not mesh.virtual:
            for d in DIM_ORDER:
                C.register_group(mesh.group(d))

    def __call__(self, gm: GraphModule, example_inputs: list) -> Callable:
        from torch.fx.experimental.proxy_tensor import make_fx

        params = {i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter)}
        traced = make_fx(gm, pre_dispatch=True, tracing_mode="fake")(*example_inputs)
        graph = traced.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        first = next(n for n in graph.nodes if n.op != "placeholder")
        for i in sorted(params):
            name = f"param_{i}"
            traced.register_parameter(name, example_inputs[i])
            node = placeholders[i]
            with graph.inserting_before(first):
                attr = graph.get_attr(name)
            attr.meta = dict(node.meta)
            node.replace_all_uses_with(attr)
            graph.erase_node(node)
        traced.recompile()
        gm2 = traced
        tp = self.mesh.size("tp")
        plan = plan_tensor_parallel(gm2, tp)
        self.plans.append(plan)
        key = self.mesh.group("tp").name
        gm3, _ = apply_tensor_parallel(gm2, plan, tp, key)
        self._slice_params(gm3, plan, key)
        self._hook_dp(example_inputs, params)
        keep = [i for i in range(len(example_inputs)) if i not in params]

        def run(*args):
            return gm3(*[args[i] for i in keep])

        return run

    @staticmethod
    def _slice_params(gm: GraphModule, plan, key: str) -> None:
        """The user's parameters are whole: cut each sharded one to this rank's shard in the graph."""
        for node in list(gm.graph.nodes):
            if node.op != "get_attr" or node.target not in plan.layouts:
                continue
            lay = plan.layouts[node.target]
            pl = parse_placement(lay.placement)
            if not pl.is_shard():
                continue
            users = list(node.users)
            with gm.graph.inserting_after(node):
                cut = gm.graph.call_function(tp_ops.shard_param, (node, pl.dim, lay.blocks, key))
            for u in users:
                u.replace_input_with(node, cut)
        gm.recompile()

    def _hook_dp(self, example_inputs: list, params: set[int]) -> None:
        dp = self.mesh.size("dp")
        if dp == 1:
            return
        key = self.mesh.group("dp").name
        for i in sorted(params):
            p = example_inputs[i]
            if not p.requires_grad or id(p) in self._hooked:
                continue
            self._hooked.add(id(p))

            def average(t: torch.Tensor) -> None:
                t.grad.div_(dp)
                C.all_reduce_(t.grad, key)

            p.register_post_accumulate_grad_hook(average)


def backend(mesh: Mesh) -> Backend:
    """A ``torch.compile`` backend that runs the compiled graphs tensor- and data-parallel on ``mesh``."""
    return Backend(mesh)


def set_mesh(mesh: Mesh) -> None:
    """Make ``torch.compile(model, backend="autoshard")`` use ``mesh``."""
    _default_mesh[:] = [Backend(mesh)]


def registered(gm: GraphModule, example_inputs: list) -> Callable:
    """The backend torch.compile finds under the name "autoshard" (a ``torch_dynamo_backends`` entry point)."""
    if not _default_mesh:
        raise RuntimeError('backend="autoshard" needs a mesh: call autoshard.set_mesh(mesh) first, or pass '
                           "backend=autoshard.backend(mesh)")
    return _default_mesh[0](gm, example_inputs)

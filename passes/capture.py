"""Capture: an unmodified ``nn.Module`` → an aten-level FX ``GraphModule`` via ``torch.export``.

Non-strict export in training IR keeps autograd-visible aten ops, lifts parameters and buffers to
``get_attr`` nodes of the unlifted module, and records ``nn_module_stack`` and ``stack_trace`` on
every node, which the passes use to name modules and source lines. Hugging Face models are captured
with ``config.use_cache = False`` (a ``DynamicCache`` in the output cannot be exported) and their
``ModelOutput`` results pass through unchanged thanks to pytree registration.
"""

from __future__ import annotations

import contextlib
import traceback
from typing import Any

import torch
from torch.fx import GraphModule

from autoshard.runtime.errors import CaptureError

from .expert_parallel import intercept_moe


@contextlib.contextmanager
def _param_dtype(model: torch.nn.Module, dtype: torch.dtype | None):
    """Temporarily give every floating parameter ``dtype`` (uninitialised), so the graph traces the
    dtypes a bf16/fp16 model computes in; the originals are put back untouched afterwards."""
    if dtype is None:
        yield
        return
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    stand_in: dict[int, torch.nn.Parameter] = {}
    try:
        for mod in model.modules():
            for name, p in list(mod._parameters.items()):
                if p is None or not p.is_floating_point():
                    continue
                if id(p) not in stand_in:
                    stand_in[id(p)] = torch.nn.Parameter(torch.empty_like(p, dtype=dtype), requires_grad=p.requires_grad)
                swapped.append((mod, name, p))
                mod._parameters[name] = stand_in[id(p)]
        yield
    finally:
        for mod, name, p in swapped:
            mod._parameters[name] = p


@contextlib.contextmanager
def _capture_mode(model: torch.nn.Module, training: bool):
    cfg = getattr(model, "config", None)
    old_cache = getattr(cfg, "use_cache", None) if cfg is not None else None
    was_training = model.training
    try:
        if cfg is not None and old_cache is not None:
            cfg.use_cache = False
        model.train(training)
        yield
    finally:
        if cfg is not None and old_cache is not None:
            cfg.use_cache = old_cache
        model.train(was_training)


def capture(
    model: torch.nn.Module,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    training: bool = True,
    param_dtype: torch.dtype | None = None,
    moe: dict | None = None,
) -> GraphModule:
    """Export ``model(*args, **kwargs)`` to an aten-level graph module that shares its parameters.

    ``param_dtype`` captures the model as if its floating parameters had that dtype (bf16/fp16
    compute), without changing them. ``moe``: mixture-of-experts layers found by
    :func:`autoshard.passes.expert_parallel.find_moe_layers`, each captured as one op.

    Raises :class:`CaptureError` quoting the export failure and what to try.
    """
    kwargs = dict(kwargs or {})
    try:
        with _capture_mode(model, training), _param_dtype(model, param_dtype), intercept_moe(model, moe):
            ep = torch.export.export(model, tuple(args), kwargs, strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        last = "".join(traceback.format_exception_only(type(e), e)).strip()
        if len(last) > 1500:
            last = last[:1500] + " ..."
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}:\n  {last}\n"
            "What to try: make the forward free of data-dependent Python control flow and of "
            "non-tensor outputs (for Hugging Face models pass use_cache=False), check that the "
            "example inputs match what the model expects, or run "
            "torch.export.export(model, args, strict=False) yourself to see the failing line."
        ) from e
    try:  # ep.module() writes the graph out as Python source and compiles it: names can still break it
        gm = ep.module()
    except Exception as e:  # noqa: BLE001 - re-raised with context
        last = "".join(traceback.format_exception_only(type(e), e)).strip()
        if len(last) > 1500:
            last = last[:1500] + " ..."
        hint = ("a submodule, parameter or buffer name holds a character that cannot appear in the Python code "
                "torch.fx generates (a quote, a backslash or a newline); rename it, e.g. add_module('a_b', ...) "
                "instead of add_module('a\"b', ...)") if isinstance(e, SyntaxError) else (
                "run torch.export.export(model, args, strict=False).module() yourself to see the failing line")
        raise CaptureError(
            f"torch.export captured {type(model).__name__} but could not turn the graph into a module:\n  {last}\n"
            f"What to try: {hint}."
        ) from e
    if not isinstance(gm, GraphModule):  # pragma: no cover - torch always returns one today
        raise CaptureError(f"torch.export returned {type(gm).__name__}, expected a GraphModule")
    strip_metadata_asserts(gm)
    return gm


def strip_metadata_asserts(gm: GraphModule) -> int:
    """Remove ``aten._assert_tensor_metadata`` nodes (export records one per ``.to()`` call).

    They check the device and dtype seen while exporting, written as the user wrote them: a model
    that says ``.to("cuda")`` records ``cuda``, while its tensors live on ``cuda:0``. Fake-tensor
    tracing of the joint graph compares the two strictly and fails; after capture the graph's dtypes
    and devices are the plan's business, so the checks are dropped, in the subgraphs of higher-order
    ops too (Hugging Face's rotary embedding runs under ``autocast(enabled=False)``, which export
    keeps as a ``wrap_with_autocast`` submodule). Returns how many were removed.
    """
    removed = 0
    for mod in gm.modules():
        if not isinstance(mod, GraphModule):
            continue
        doomed = [n for n in mod.graph.nodes if n.op == "call_function"
                  and n.target is torch.ops.aten._assert_tensor_metadata.default and not n.users]
        for n in doomed:
            mod.graph.erase_node(n)
        if doomed:
            mod.recompile()
            removed += len(doomed)
    return removed

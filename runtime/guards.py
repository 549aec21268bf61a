"""Step guards: what every rank must agree on at the end of a training step, checked every step.

One small all-gather over the world per step (``K`` float64 numbers per rank) carries each rank's

* step counter (attempts: it counts ``train_step`` calls, including ones that raised) and plan
  fingerprint: a rank whose ``train_step`` raised while its caller caught the exception and went on
  has skipped collectives the others made; from then on the ranks pair up the wrong collectives.
  The counters then differ and every rank raises :class:`DesyncError` naming the step and ranks;
* local batch rows: data-parallel ranks with unequal batches would average their losses and
  gradients with equal weights, a different function than one process on the whole batch; refused;
* a polynomial hash of the batch (tensor parallelism only; computed on the device): ranks that differ
  only in tp must be fed the same batch, element for element;
* the range of token ids read by a vocab-parallel embedding (tensor parallelism only): ids outside
  ``[0, vocab)`` would be masked to zero vectors there, where PyTorch raises ``IndexError``;
* whether this rank's gradients are finite (without the ZeRO manager, which checks its own): a
  finite loss with a non-finite gradient skips the step on every rank instead of writing NaN.

The gather is launched after the loss all-reduce and read at the step's existing host
synchronisation (``float(loss)``, or the ZeRO manager's one copy): no extra host sync. Every rank
receives every rank's numbers, so all decide alike and raise together; a failed check poisons the
loss handed to the optimizer step (NaN), so no update is applied before the error is raised.

``AUTOSHARD_CHECK_INPUTS=0`` turns off the batch hash and the token-id range check (the step counter,
row count and gradient checks stay on: they cost nothing on the device).
"""

from __future__ import annotations

import hashlib
import math
import os
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import MappingKey, SequenceKey, tree_flatten, tree_flatten_with_path

from .errors import DesyncError

_M = 2**31 - 1  # hash modulus (prime); products of two residues fit in int64
_P = 1_000_003  # hash base
K = 10  # per rank: attempt, fingerprint, rows, batch hash, bad ids, min id, max id, vocab, bad grads, which inputs
_ATTEMPT, _FP, _ROWS, _HASH, _BAD, _MIN, _MAX, _VOCAB, _GRAD, _WHICH = range(K)


def checks_enabled() -> bool:
    """``AUTOSHARD_CHECK_INPUTS=0`` (or ``false``/``off``) turns off the per-step input checks."""
    return os.environ.get("AUTOSHARD_CHECK_INPUTS", "1").strip().lower() not in ("0", "false", "off", "no")


def embedding_inputs(gm: torch.fx.GraphModule, vocab: dict[str, int], example: Any) -> list[tuple[tuple, int]]:
    """The inputs (pytree key paths into ``example`` = ``(args, kwargs)``) that a vocab-parallel
    embedding reads, each with that embedding's vocabulary size.

    ``vocab``: parameter name -> rows, for the embeddings the tensor-parallel plan splits by
    vocabulary. The captured graph's placeholders are the example's flattened leaves, in order.
    """
    if not vocab:
        return []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    leaves = tree_flatten_with_path(example)[0]
    if len(placeholders) != len(leaves):
        return []
    index = {n: i for i, n in enumerate(placeholders)}
    passthrough = {"view", "reshape", "_unsafe_view", "to", "_to_copy", "alias", "clone", "contiguous"}
    found: dict[tuple, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or _op_name(node) != "embedding" or len(node.args) < 2:
            continue
        w, ids = node.args[0], node.args[1]
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr" and w.target in vocab):
            continue
        while isinstance(ids, torch.fx.Node) and ids.op == "call_function" and ids.args and _op_name(ids) in passthrough:
            ids = ids.args[0]
        if isinstance(ids, torch.fx.Node) and ids in index:
            path = leaves[index[ids]][0]
            found[path] = min(found.get(path, vocab[w.target]), vocab[w.target])
    return list(found.items())


def _op_name(node: torch.fx.Node) -> str:
    return getattr(getattr(node.target, "overloadpacket", None), "__name__", "")


def _path_name(path: tuple) -> str:
    """``args[0]`` or ``input_ids``: how the user passed an input (``path`` into ``(args, kwargs)``)."""
    if len(path) >= 2 and isinstance(path[0], SequenceKey):
        head = f"args[{path[1].idx}]" if path[0].idx == 0 and isinstance(path[1], SequenceKey) else str(
            getattr(path[1], "key", path[1]))
        return head + "".join(f"[{getattr(k, 'idx', getattr(k, 'key', k))!r}]" for k in path[2:])
    return str(path)


def _leaf(tree: Any, path: tuple) -> Any:
    for key in path:
        if isinstance(key, SequenceKey):
            tree = tree[key.idx]
        elif isinstance(key, MappingKey):
            tree = tree[key.key]
        else:
            return None
    return tree


_powers: dict[torch.device, torch.Tensor] = {}


def _power_table(n: int, device: torch.device) -> torch.Tensor:
    """``P**i mod M`` for ``i < n`` on ``device`` (grown by doubling, kept for the next step)."""
    pw = _powers.get(device)
    if pw is None or pw.numel() < n:
        t = torch.ones(1, dtype=torch.int64)
        while t.numel() < n:
            t = torch.cat([t, t * pow(_P, t.numel(), _M) % _M])
        pw = _powers[device] = t.to(device)
    return pw[:n]


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def batch_hash(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A polynomial hash (mod 2**31 - 1) of the tensors' bits, shapes and order, on the device."""
    h = torch.zeros((), dtype=torch.int64, device=device)
    for t in tensors:
        x = t.detach().reshape(-1).to(device)
        if x.dtype == torch.bool:
            x = x.to(torch.uint8)
        if x.is_complex():
            x = torch.view_as_real(x).reshape(-1)
        if x.is_floating_point():
            x = x.view(_INT_OF_SIZE[x.element_size()])
        x = x.long() % _M
        hx = (x * _power_table(x.numel(), device) % _M).sum() % _M if x.numel() else h * 0
        h = (h * _P + hx + x.numel() + 7 * len(t.shape)) % _M
    return h


class StepGuard:
    """One rank's side of the per-step agreement (module docstring). ``begin`` at the top of a
    training step, ``exchange`` after the loss all-reduce, ``problem`` after the host sync."""

    def __init__(self, mesh: Any, owner: Any, vocab_inputs: list[tuple[tuple, int]]) -> None:
        """``owner``: the module whose ``plan.fingerprint`` the first step reads (held weakly: the plan
        is made after the guard); ``vocab_inputs``: from :func:`embedding_inputs`."""
        self.mesh = mesh
        self.device = mesh.device
        self.enabled = not mesh.virtual and mesh.world_size > 1 and dist.is_available() and dist.is_initialized()
        self._owner = weakref.ref(owner)
        self.fingerprint: int | None = None
        self.vocab_inputs = vocab_inputs
        self.tp = mesh.size("tp")
        self.attempt = 0
        self._local: list[Any] = []
        self._all: torch.Tensor | None = None
        if self.enabled:
            # per rank: the data slice it loads and the lowest rank of its tp group
            world = mesh.world_size
            coords = [mesh._coords_of(r) for r in range(world)]
            self.data_rank = [c["dp"] * mesh.degrees["ep"] + c["ep"] for c in coords]
            root = {}
            for r, c in enumerate(coords):
                root.setdefault(tuple((d, v) for d, v in c.items() if d != "tp"), r)
            self.tp_root = [root[tuple((d, v) for d, v in c.items() if d != "tp")] for c in coords]
            self._tp_root_t = torch.tensor(self.tp_root, device=self.device)

    # ------------------------------------------------------------------ before the program runs
    def begin(self, batch: Any) -> None:
        """Count the attempt and measure the batch (device work only, no sync). ``batch`` is
        ``(args, kwargs, target)`` as the step received it."""
        self.attempt += 1
        self._all = None
        if not self.enabled:
            return
        if self.fingerprint is None:
            digest = hashlib.sha256(self._owner().plan.fingerprint.encode()).digest()
            self.fingerprint = int.from_bytes(digest[:6], "big")  # 48 bits: exact in float64
        dev = self.device
        leaves = [x for x in tree_flatten(batch)[0] if isinstance(x, torch.Tensor)]
        inputs = [x for x in tree_flatten(batch[:2])[0] if isinstance(x, torch.Tensor)]
        rows = float(inputs[0].shape[0]) if inputs and inputs[0].dim() else -1.0
        local: list[Any] = [float(self.attempt), float(self.fingerprint), rows] + [0.0] * (K - 3)
        if checks_enabled() and self.tp > 1:
            local[_HASH] = batch_hash(leaves, dev)
            bad = mn = mx = None
            vocab = 0
            which = None
            for i, (path, v) in enumerate(self.vocab_inputs[:50]):
                ids = _leaf(batch[:2], path)
                if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or not ids.numel():
                    continue
                ids = ids.to(dev)
                b = ((ids < 0) | (ids >= v)).sum()
                bad = b if bad is None else bad + b
                w = (b > 0).double() * 2.0**i  # which inputs held the bad ids (a bit each)
                which = w if which is None else which + w
                mn = ids.min() if mn is None else torch.minimum(mn, ids.min())
                mx = ids.max() if mx is None else torch.maximum(mx, ids.max())
                vocab = v if not vocab else min(vocab, v)
            if bad is not None:
                local[_BAD], local[_MIN], local[_MAX], local[_VOCAB], local[_WHICH] = bad, mn, mx, float(vocab), which
        self._local = local
        if self.attempt == 1:  # the first step also checks before its program runs (one sync, once), so a
            self._all = self._gather(list(local))  # batch of the wrong shape fails before tp collectives pair
            problem = self.problem(0)
            self._all = None
            if problem is not None:
                raise problem

    def _gather(self, local: list[Any]) -> torch.Tensor:
        """Every rank's numbers, ``[world, K]`` on the device (one all-gather over the world)."""
        dev = self.device
        vec = torch.tensor([0.0 if isinstance(v, torch.Tensor) else v for v in local], dtype=torch.float64).to(dev)
        for i, v in enumerate(local):  # device values copied in place: no host sync
            if isinstance(v, torch.Tensor):
                vec[i] = v.to(torch.float64).reshape(())
        parts = [torch.empty_like(vec) for _ in range(self.mesh.world_size)]
        dist.all_gather(parts, vec)
        return torch.stack(parts)

    # ------------------------------------------------------------------ after the loss all-reduce
    def exchange(self, loss: torch.Tensor, optimizer: Any = None) -> torch.Tensor:
        """Gather every rank's numbers (one all-gather over the world); start their copy to the host.

        ``optimizer``: given when no ZeRO manager checks the gradients, whose finiteness then joins.
        Returns ``loss``, or NaN when a check failed (so no update is applied before :meth:`problem`).
        """
        if not self.enabled or not self._local:
            return loss
        local = list(self._local)
        self._local = []
        if optimizer is not None:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                local[_GRAD] = (~torch.isfinite(torch.stack([n.double() for n in norms]).sum())).double()
        every = self._gather(local)  # [world, K]
        fatal = ((every[:, _ATTEMPT] != every[0, _ATTEMPT]).any() | (every[:, _FP] != every[0, _FP]).any()
                 | (every[:, _ROWS] != every[0, _ROWS]).any() | (every[:, _BAD] > 0).any()
                 | (every[:, _HASH] != every[self._tp_root_t, _HASH]).any())
        self._all = every.to("cpu", non_blocking=True) if every.device.type == "cuda" else every
        return torch.where(fatal, torch.full_like(loss, math.nan), loss)

    # ------------------------------------------------------------------ after the host sync
    def grads_finite(self) -> bool:
        """Whether every rank's gradients were finite (read after the step's host sync)."""
        return self._all is None or not bool((self._all[:, _GRAD] > 0).any())

    def problem(self, step: int) -> Exception | None:
        """The error every rank raises for this step, or None; the same on every rank."""
        if self._all is None:
            return None
        a = self._all.tolist()
        ranks = range(len(a))
        attempts = [int(r[_ATTEMPT]) for r in a]
        if len(set(attempts)) > 1 or len({r[_FP] for r in a}) > 1:
            odd = [r for r in ranks if attempts[r] > min(attempts)]  # ahead: they made calls that raised
            if len(set(attempts)) == 1:
                return DesyncError(f"step {step}: ranks run different plans (their fingerprints differ); every "
                                   "rank must pass the same model, example input shapes and mesh")
            return DesyncError(
                f"step {step}: the ranks are out of step: "
                + ", ".join(f"rank {r} is at its train_step call {attempts[r]}" for r in ranks)
                + f" (ranks {odd} are ahead). A train_step raised on a rank ahead and the exception "
                "was caught, so that rank skipped collectives the others made; this step's gradients are "
                "mixed across steps. Let the exception end every rank (or raise it on all), then restart "
                "from the last checkpoint.")
        rows = [int(r[_ROWS]) for r in a]
        if len(set(rows)) > 1:
            per = {}
            for r in ranks:
                per.setdefault(self.data_rank[r], rows[r])
            return ValueError(
                f"step {step}: data-parallel ranks were given unequal local batches ("
                + ", ".join(f"data rank {d}: {n} rows" for d, n in sorted(per.items()))
                + "); their losses and gradients would be averaged with equal weights, which is not the "
                "mean over the global batch. Give every rank the same number of rows (drop or pad the "
                "last partial batch)")
        bad = [r for r in ranks if a[r][_BAD] > 0]
        if bad:
            r0 = a[bad[0]]
            names = [_path_name(p) for i, (p, _) in enumerate(self.vocab_inputs[:50]) if int(r0[_WHICH]) >> i & 1]
            return IndexError(
                f"index out of range in self: step {step}: token ids outside [0, {int(r0[_VOCAB])}) were given to "
                f"an embedding through the input {', '.join(names) or '?'} (ids from {int(r0[_MIN])} to "
                f"{int(r0[_MAX])}; {int(r0[_BAD])} out of range on rank {bad[0]}; ranks {bad}). Labels such as -100 "
                "belong in the target, not the model's inputs")
        diff = [r for r in ranks if a[r][_HASH] != a[self.tp_root[r]][_HASH]]
        if diff:
            return ValueError(
                f"step {step}: ranks that differ only in tp were given different batches (ranks {diff} differ "
                f"from ranks {sorted({self.tp_root[r] for r in diff})} of their tp groups): each must load "
                "the slice mesh.data_rank of the global batch. (AUTOSHARD_CHECK_INPUTS=0 turns this check off.)")
        return None

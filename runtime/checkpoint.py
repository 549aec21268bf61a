"""Sharded, atomic, reshardable checkpoints of a :class:`~autoshard.ShardedModule`.

On disk a checkpoint is a directory::

    path/
      manifest.json          format version, the saving plan, mesh degrees, step, parameter names and
                             full shapes, and every shard file with its size, sha256 and parameter names
      rank-pp{p}-tp{t}.pt    what the ranks with dp (and ep) coordinate 0 hold: ``torch.save`` of
                             ``ShardedModule.local_training_state()`` (tp shards, whole over dp, fp32)

Why this shape. Data-parallel ranks hold the same values (ZeRO slices are gathered first), so one
writer per (pp, tp) coordinate stores everything once and a file never depends on ``dp`` or ZeRO.
Each file keeps the *tensor-parallel shard* of a parameter as the saving plan cut it; the manifest
records that plan, so :func:`load` can put the pieces back together (``unshard_tensor`` with the old
layout) and cut them again for any other plan (``shard_tensor`` with the new one): a different tp,
pp or dp degree, another ZeRO stage, another world size. When old and new layouts agree a rank reads
only the file of its own coordinate.

Atomicity. :func:`save` writes into ``path.tmp-<token>`` next to ``path``, and only when every file
is written, flushed and hashed does rank 0 write the manifest and swap the directory in:
``path`` → ``path.old-<token>``, ``path.tmp-<token>`` → ``path``, then move the files of the old
directory that its manifest does not list (the user's: a tokenizer, a log) into the new one and delete
only what the old manifest lists. A crash before the swap leaves a previous checkpoint at ``path``
untouched (and a ``.tmp-`` directory, which the next successful save deletes); a failed swap puts the
previous one back. Every rank learns of a failure on any rank and raises :class:`CheckpointError`, so
none is left waiting in a collective. Ranks must see one shared file system.

Ownership. A save replaces only what autoshard wrote and can prove it wrote: a ``manifest.json`` with
autoshard's format marker and the files that manifest lists. Any other non-empty directory at
``path`` (a project with its own ``manifest.json``, say) is an error that names it, and nothing is
touched. Ranks exchange metadata as JSON bytes in tensors, never pickles.

Validation. :func:`load` checks the manifest (format version, the model's parameter names and full
shapes), that every listed file exists with its recorded size, and the sha256 of every file a rank
reads, *before* anything in the module changes; ranks exchange their verdicts, so a failure on one
rank raises the same :class:`CheckpointError` on all of them and leaves every rank's module as it was.
Files are read with ``torch.load(weights_only=True)``: no arbitrary objects are unpickled.

RNG. Only writer ranks save their RNG state; on load each rank takes the state of the file with its
own (pp, tp) coordinate (the first file it reads when there is none), so data-parallel ranks resume
with the RNG of their dp=0 peer.

Why this module is long: saving, the ownership-checked swap, validation and resharding on load share
the manifest's format and the failure protocol between ranks; split, each half would restate them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import secrets
import shutil
from typing import Any

import torch
import torch.distributed as dist

from .errors import CheckpointError
from .layout import shard_tensor, unshard_tensor
from .plan import parse_placement
from .zero import optimizer_name

# the API's ShardedModule, read through its public methods (runtime never imports the API package)
ShardedModule = Any

FORMAT = "autoshard-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_CHUNK = 8 << 20


# ---------------------------------------------------------------------------------------------- collectives
# Ranks exchange only JSON, as bytes in uint8 tensors: nothing that crosses between ranks is unpickled.
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    """Where the default group's collectives take tensors (the current GPU under NCCL, else the CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _encode(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _decode(blob: torch.Tensor, size: int) -> Any:
    return json.loads(blob[:size].cpu().numpy().tobytes().decode())


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (JSON data), in rank order (``[obj]`` without a process group)."""
    if not _distributed():
        return [obj]
    device, world = _device(), dist.get_world_size()
    blob = _encode(obj)
    size = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = max(int(s) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    if blob:
        mine[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
    blobs = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(blobs, mine)
    return [_decode(b, int(s)) for b, s in zip(blobs, sizes)]


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` (JSON data) on every rank."""
    if not _distributed():
        return obj
    device = _device()
    blob = _encode(obj) if dist.get_rank() == 0 else b""
    size = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    data = torch.zeros(int(size), dtype=torch.uint8, device=device)
    if blob:
        data.copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device))
    dist.broadcast(data, src=0)
    return _decode(data, int(size))


def _agree(error: str | None) -> None:
    """Raise the first rank's error on every rank, so that all of them stop together or none does."""
    errors = [e for e in _all_gather(error) if e]
    if errors:
        raise CheckpointError(errors[0])


# ---------------------------------------------------------------------------------------------- files
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (where the platform allows opening directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_name(pp: int, tp: int) -> str:
    return f"rank-pp{pp}-tp{tp}.pt"


def _compact(state: Any) -> Any:
    """Copy tensors that view a larger storage (ZeRO's gathered buckets) so files hold only their values."""
    if isinstance(state, dict):
        return {k: _compact(v) for k, v in state.items()}
    if isinstance(state, torch.Tensor):
        t = state.detach()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        return t
    return state


# ---------------------------------------------------------------------------------------------- save
def save(sm: ShardedModule, path: str | os.PathLike) -> None:
    """Write ``sm``'s training state to the directory ``path``, atomically (collective: every rank calls it).

    Saves parameters (fp32 masters under ZeRO), per-parameter optimizer states and scalars, the loss
    scaler, the step counters and the writer ranks' RNG state. ``path`` is replaced only once the new
    checkpoint is complete. An existing ``path`` must be an empty directory or an autoshard checkpoint
    (its manifest carries autoshard's format marker); of a checkpoint only the manifest and the files
    it lists are replaced, anything else kept there (a tokenizer, a log) stays. Anything else at
    ``path`` raises :class:`CheckpointError` naming it, before anything is written. Interrupted saves'
    ``path.tmp-*`` directories (holding only autoshard's files) are deleted by the next successful save.
    """
    path = os.path.abspath(os.fspath(path))
    mesh = sm.mesh
    rank = mesh.rank
    token = _broadcast(secrets.token_hex(4) if rank == 0 else None)
    tmp = f"{path}.tmp-{token}"
    error = None
    if rank == 0:
        try:
            writes = {MANIFEST} | {_file_name(p, t) for p in range(mesh.size("pp")) for t in range(mesh.size("tp"))}
            _replaceable(path, writes)  # nothing is touched unless autoshard owns what it would replace
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            os.mkdir(tmp)
        except (OSError, CheckpointError) as e:
            error = str(e) if isinstance(e, CheckpointError) else f"cannot create the checkpoint directory {tmp}: {e}"
    _agree(error)  # also the barrier before anyone writes into tmp

    state = sm.local_training_state()  # collective over dp: every rank takes part
    writer = mesh.coord("dp") == 0 and mesh.coord("ep") == 0
    info, error = None, None
    if writer:
        pp, tp = mesh.coord("pp"), mesh.coord("tp")
        name = _file_name(pp, tp)
        target = os.path.join(tmp, name)
        try:
            with open(target, "wb") as f:
                torch.save(_compact(state), f)
                f.flush()
                os.fsync(f.fileno())
            info = {"file": name, "pp": pp, "tp": tp, "bytes": os.path.getsize(target), "sha256": _sha256(target),
                    "params": sorted(state["params"])}
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            error = f"rank {rank} could not write {target}: {type(e).__name__}: {e}"
    gathered = _all_gather((info, error))  # the barrier after the writes
    errors = [e for _, e in gathered if e]
    if errors:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(errors[0])

    error = None
    if rank == 0:
        files = sorted((i for i, _ in gathered if i is not None), key=lambda i: (i["pp"], i["tp"]))
        try:
            _write_manifest(sm, tmp, files, state["step"])
            _replaceable(path, {MANIFEST, *(f["file"] for f in files)})  # still, after the writes
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            shutil.rmtree(tmp, ignore_errors=True)
            error = str(e) if isinstance(e, CheckpointError) else (
                f"saving {path} failed before the new checkpoint was in place ({type(e).__name__}: {e}); "
                "any previous checkpoint there is unchanged")
        else:
            try:
                _swap(tmp, path, token)
            except CheckpointError as e:  # neither directory could be put in place (both are kept), or files of
                error = str(e)            # the user's could not move into the new one (they are kept, named)
            except Exception as e:  # noqa: BLE001 - reported to every rank below
                shutil.rmtree(tmp, ignore_errors=True)
                error = (f"saving {path} failed before the new checkpoint was in place ({type(e).__name__}: {e}); "
                         "any previous checkpoint there is unchanged")
            else:
                _clean_stale(path, token)
    error = _broadcast(error)  # the final barrier: nobody returns before the swap
    if error:
        raise CheckpointError(error)


def _write_manifest(sm: ShardedModule, tmp: str, files: list[dict], step: int) -> None:
    plan = sm.plan.to_dict()
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": int(step),
        "mesh": sm.mesh.to_dict(),
        "optimizer": optimizer_name(sm.optimizer),
        "params": {n: list(p.shape) for n, p in sm.plan.params.items()},
        "files": files,
        "plan": plan,
        "torch": torch.__version__,
    }
    target = os.path.join(tmp, MANIFEST)
    with open(target, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


_TOKEN = re.compile(r"[0-9a-f]{8}")
_OWN_FILE = re.compile(r"rank-pp\d+-tp\d+\.pt")


def _regular(path: str) -> bool:
    return os.path.isfile(path) and not os.path.islink(path)


def _owned(path: str) -> set[str]:
    """The entries of directory ``path`` that autoshard wrote and can prove it wrote: its manifest, with
    autoshard's format marker, and the regular files that manifest lists under autoshard's file names.
    Raises :class:`CheckpointError` (saying why) when ``path`` is not an autoshard checkpoint."""
    manifest = read_manifest(path)
    try:
        listed = {f["file"] for f in manifest["files"]}
    except (KeyError, TypeError):
        raise CheckpointError(f"the manifest of {path} does not list its files") from None
    if not _regular(os.path.join(path, MANIFEST)):
        raise CheckpointError(f"{os.path.join(path, MANIFEST)} is not a regular file")
    return {MANIFEST} | {n for n in listed if isinstance(n, str) and _OWN_FILE.fullmatch(n)
                         and _regular(os.path.join(path, n))}


def _replaceable(path: str, writes: set[str]) -> None:
    """Raise unless a save to ``path`` replaces only what autoshard wrote there (``writes``: the new names)."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        raise CheckpointError(f"{path} exists and is not a directory: refusing to replace it with a checkpoint; "
                              "choose another path or remove it")
    entries = set(os.listdir(path))
    if not entries:
        return
    try:
        owned = _owned(path)
    except CheckpointError as e:
        raise CheckpointError(f"{path} is a non-empty directory that autoshard cannot prove it wrote ({e}): refusing "
                              "to replace it or anything in it; choose another path or empty it") from None
    clash = sorted((entries - owned) & writes)
    if clash:
        raise CheckpointError(f"{os.path.join(path, clash[0])} was not written by this checkpoint but the new one "
                              "would write that name: refusing to replace it; move it or choose another path")


def _swap(tmp: str, path: str, token: str) -> None:
    """Put the finished ``tmp`` at ``path``; if that fails, put the previous checkpoint back.

    Files at ``path`` that the previous checkpoint's manifest does not list (the user's own) move
    into the new checkpoint after the swap; only autoshard's files are deleted with the old directory.
    """
    old = None
    if os.path.lexists(path):
        old = f"{path}.old-{token}"
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException as e:
        if old is not None:
            try:
                os.rename(old, path)
            except OSError as again:
                raise CheckpointError(
                    f"the new checkpoint could not be moved to {path} ({e}) nor the previous one put back ({again}): "
                    f"the previous checkpoint is at {old} and the new, complete one at {tmp}; rename either to {path}"
                ) from e
        raise
    _fsync_dir(os.path.dirname(path))
    if old is None:
        return
    try:
        owned = _owned(old) if os.listdir(old) else set()  # checked by _replaceable just before
        kept = []
        for name in sorted(set(os.listdir(old)) - owned):
            try:
                os.rename(os.path.join(old, name), os.path.join(path, name))
            except OSError:
                kept.append(name)
        _fsync_dir(path)
        if not kept:  # never delete what autoshard did not write: with files of the user's left, keep it all
            for name in owned:
                os.remove(os.path.join(old, name))
            os.rmdir(old)
    except (OSError, CheckpointError) as e:
        raise CheckpointError(f"the checkpoint at {path} is saved, but the previous one could not be cleared away "
                              f"({e}); what is left of it is in {old}") from e
    if kept:
        raise CheckpointError(f"the checkpoint at {path} is saved, but {len(kept)} file(s) of yours that were in "
                              f"that directory could not be moved into it (first {kept[0]!r}); they are in {old}")


def _clean_stale(path: str, token: str) -> None:
    """Delete ``path.tmp-<token>`` directories of interrupted saves: only those that hold autoshard's files alone."""
    for tmp in glob.glob(glob.escape(path) + ".tmp-*"):
        suffix = tmp[len(path) + len(".tmp-"):]
        if suffix == token or not _TOKEN.fullmatch(suffix) or os.path.islink(tmp) or not os.path.isdir(tmp):
            continue
        try:
            names = os.listdir(tmp)
            if all((n == MANIFEST or _OWN_FILE.fullmatch(n)) and _regular(os.path.join(tmp, n)) for n in names):
                for n in names:
                    os.remove(os.path.join(tmp, n))
                os.rmdir(tmp)
        except OSError:  # best effort: the new checkpoint is in place whatever happens here
            pass


# ---------------------------------------------------------------------------------------------- load
def load(path: str | os.PathLike, sm: ShardedModule) -> None:
    """Load the checkpoint at ``path`` into ``sm``, whatever plan saved it (collective: every rank calls it).

    Raises :class:`CheckpointError`, on every rank and with ``sm`` unchanged, when the checkpoint is
    missing, of an unknown format version, incomplete, corrupt or truncated, or from a different model.
    """
    path = os.path.abspath(os.fspath(path))
    state, error = None, None
    try:
        manifest = read_manifest(path)
        _check_model(manifest, sm, path)
        state = _assemble(path, manifest, sm)
    except CheckpointError as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 - any failure to read must reach every rank
        error = f"cannot read the checkpoint at {path}: {type(e).__name__}: {e}"
    _agree(error)  # nothing has changed yet: every rank loads, or none does
    sm.load_local_training_state(state)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The validated ``manifest.json`` of the checkpoint at ``path`` (no collective)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist{_leftovers(path)}")
    target = os.path.join(path, MANIFEST)
    if not os.path.isfile(target):
        raise CheckpointError(f"{path} is not a complete autoshard checkpoint: it has no {MANIFEST}")
    try:
        with open(target) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{target} is unreadable or not valid JSON ({e}): the checkpoint is corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{target} is not an autoshard checkpoint manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {manifest.get('version')!r}; this autoshard "
                              f"reads version {FORMAT_VERSION}")
    missing = [k for k in ("mesh", "params", "files", "plan") if k not in manifest]
    if missing:
        raise CheckpointError(f"{target} lacks {', '.join(missing)}: the checkpoint is corrupt")
    return manifest


def _leftovers(path: str) -> str:
    old = sorted(glob.glob(glob.escape(path) + ".old-*"))
    if old:
        return (f"; a save was interrupted while swapping directories and the previous checkpoint is at {old[0]}: "
                f"rename it to {path}")
    tmp = sorted(glob.glob(glob.escape(path) + ".tmp-*"))
    if tmp:
        return f"; {tmp[0]} is an interrupted, incomplete save and can be deleted"
    return ""


def _check_model(manifest: dict, sm: ShardedModule, path: str) -> None:
    """The checkpoint must come from the same model: same parameter names and full shapes."""
    saved = {n: tuple(s) for n, s in manifest["params"].items()}
    mine = {n: tuple(p.shape) for n, p in sm.plan.params.items()}
    for n in [*mine, *(n for n in saved if n not in mine)]:  # in the model's order
        if n not in saved:
            raise CheckpointError(f"the checkpoint at {path} is from a different model: it has no parameter {n!r}")
        if n not in mine:
            raise CheckpointError(f"the checkpoint at {path} is from a different model: its parameter {n!r} is not "
                                  "in this model")
        if saved[n] != mine[n]:
            raise CheckpointError(f"the checkpoint at {path} is from a different model: parameter {n!r} has shape "
                                  f"{list(saved[n])} there and {list(mine[n])} here")
    want = optimizer_name(sm.optimizer)
    have = manifest.get("optimizer")
    if want is not None and have is not None and want != have:
        raise CheckpointError(f"the checkpoint at {path} holds {have} states but this module trains with {want}; "
                              "to start a new optimizer from its weights, import_state_dict(sm, state_dict)")


def _layout(plan_params: dict, name: str, tp: int) -> tuple[int | None, int]:
    """(sharded dim or None when every tp rank holds the whole tensor, blocks) of ``name`` in a plan."""
    lay = plan_params[name]
    placement, blocks = (lay["placement"], lay.get("blocks", 1)) if isinstance(lay, dict) else (lay.placement, lay.blocks)
    pl = parse_placement(placement)
    return (pl.dim if pl.is_shard() and tp > 1 else None), blocks


def _assemble(path: str, manifest: dict, sm: ShardedModule) -> dict[str, Any]:
    """This rank's ``local_training_state`` under ``sm``'s plan, rebuilt from the saved pieces."""
    files = {(int(f["pp"]), int(f["tp"])): f for f in manifest["files"]}
    for (pp, tp), f in files.items():  # every listed file, on every rank: a hole is found wherever it is
        if f["file"] != _file_name(pp, tp):  # never a path outside the checkpoint
            raise CheckpointError(f"the manifest of {path} is corrupt: it lists {f['file']!r} for pp={pp}, tp={tp}")
        target = os.path.join(path, f["file"])
        if not os.path.isfile(target):
            raise CheckpointError(f"the checkpoint at {path} is incomplete: {f['file']} is missing")
        size = os.path.getsize(target)
        if size != f["bytes"]:
            raise CheckpointError(f"the checkpoint at {path} is corrupt or truncated: {f['file']} has {size} bytes, "
                                  f"the manifest says {f['bytes']}")
    old_tp = int(manifest["mesh"].get("tp", 1))
    old_params = manifest["plan"]["params"]
    holders: dict[str, list[int]] = {}
    for (pp, tp), f in sorted(files.items()):
        if tp == 0:
            for n in f["params"]:
                holders.setdefault(n, []).append(pp)
    mesh = sm.mesh
    my_pp, my_tp, new_tp = mesh.coord("pp"), mesh.coord("tp"), mesh.size("tp")

    # which saved pieces each of this rank's parameters is rebuilt from
    recipe: dict[str, tuple[list[tuple[int, int]], int | None, int, int | None, int]] = {}
    for n in sm._params:
        if n not in holders:
            raise CheckpointError(f"the checkpoint at {path} is incomplete: no file holds parameter {n!r}")
        src_pp = my_pp if my_pp in holders[n] else holders[n][0]
        old_dim, old_blocks = _layout(old_params, n, old_tp)
        new_dim, new_blocks = _layout(sm.plan.params, n, new_tp)
        if old_dim is None:  # whole in every file of that pp coordinate
            sources = [(src_pp, my_tp if my_tp < old_tp else 0)]
        elif (old_dim, old_blocks, old_tp) == (new_dim, new_blocks, new_tp):  # same cut: my own piece
            sources = [(src_pp, my_tp)]
        else:
            sources = [(src_pp, t) for t in range(old_tp)]
        for key in sources:
            if key not in files or n not in files[key]["params"]:
                raise CheckpointError(f"the checkpoint at {path} is incomplete: {_file_name(*key)} should hold {n!r}")
        recipe[n] = (sources, old_dim, old_blocks, new_dim, new_blocks)

    needed = sorted({k for sources, *_ in recipe.values() for k in sources})
    rng_key = (my_pp, my_tp) if (my_pp, my_tp) in files else needed[0]
    loaded: dict[tuple[int, int], dict] = {}
    for key in sorted(set(needed) | {rng_key}):
        f = files[key]
        target = os.path.join(path, f["file"])
        digest = _sha256(target)
        if digest != f["sha256"]:
            raise CheckpointError(f"the checkpoint at {path} is corrupt: the sha256 of {f['file']} is {digest[:16]}..., "
                                  f"the manifest says {f['sha256'][:16]}...")
        try:
            loaded[key] = torch.load(target, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"the checkpoint at {path} is corrupt: {f['file']} does not load "
                                  f"({type(e).__name__}: {e})") from None

    full_shapes = {n: tuple(s) for n, s in manifest["params"].items()}
    params: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict[str, dict[str, float]] = {}
    for n, (sources, *layouts) in recipe.items():
        states = [loaded[k] for k in sources]
        local = tuple(sm.plan.params[n].local_shape)  # the tp shard, whole over dp and ep
        params[n] = _rebuild([s["params"][n] for s in states], layouts, new_tp, my_tp, full_shapes[n], local,
                             f"{n!r} in {path}")
        optim[n] = {}
        for k in states[0]["optim"].get(n, {}):
            pieces = [s["optim"].get(n, {}).get(k) for s in states]
            if any(p is None for p in pieces):
                raise CheckpointError(f"the checkpoint at {path} is incomplete: optimizer state {k!r} of {n!r} is "
                                      "missing from some of its files")
            optim[n][k] = _rebuild(pieces, layouts, new_tp, my_tp, full_shapes[n], local,
                                   f"optimizer state {k!r} of {n!r} in {path}")
        scalars[n] = dict(states[0]["optim_scalars"].get(n, {}))
    first = loaded[needed[0]]
    return {
        "params": params, "optim": optim, "optim_scalars": scalars,
        "loss_scaler": first.get("loss_scaler"), "step": first.get("step", 0), "skipped": first.get("skipped", 0),
        "rng": loaded[rng_key].get("rng"),
    }


def _rebuild(pieces: list[torch.Tensor], layouts: list, new_tp: int, my_tp: int, full_shape: tuple[int, ...],
             local_shape: tuple[int, ...], what: str) -> torch.Tensor:
    """This rank's piece under the new layout from the saved pieces (tp order) under the old one."""
    old_dim, old_blocks, new_dim, new_blocks = layouts
    if len(pieces) == 1 and old_dim is not None:  # the same cut as before: the piece is already mine
        out = pieces[0]
    else:
        full = unshard_tensor(pieces, old_dim, old_blocks) if old_dim is not None else pieces[0]
        if tuple(full.shape) != full_shape:
            raise CheckpointError(f"the checkpoint is inconsistent: the saved pieces of {what} make shape "
                                  f"{list(full.shape)}, its manifest says {list(full_shape)}")
        out = shard_tensor(full, new_dim, new_tp, my_tp, new_blocks) if new_dim is not None else full
    if tuple(out.shape) != local_shape:
        raise CheckpointError(f"the checkpoint is inconsistent: {what} yields shape {list(out.shape)} on this rank, "
                              f"which needs {list(local_shape)}")
    return out


# ---------------------------------------------------------------------------------------------- plain state dicts
def export_state_dict(sm: ShardedModule) -> dict[str, torch.Tensor]:
    """The model's full ``state_dict`` (its own keys, tied names included), on CPU (collective)."""
    return sm.full_state_dict()


@torch.no_grad()
def import_state_dict(sm: ShardedModule, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a plain, full ``state_dict`` of the model (e.g. a Hugging Face checkpoint's) into ``sm``.

    Every rank calls it with the same ``state_dict`` (no communication). Keys are the model's own
    ``state_dict`` keys; of tied parameters any one name will do. Parameters (and buffers given) are
    loaded; optimizer states are reset, as for a fresh optimizer. Unknown or missing keys and wrong
    shapes raise :class:`CheckpointError` before anything changes.
    """
    known = set(sm._sd_keys)
    unexpected = [k for k in state_dict if k not in known]
    if unexpected:
        raise CheckpointError(f"the state dict has {len(unexpected)} key(s) this model does not, first {unexpected[0]!r}; "
                              f"this model's keys look like {sm._sd_keys[:3]}")
    full: dict[str, torch.Tensor] = {}
    for n, lay in sm.plan.params.items():
        names = [n, *lay.aliases]
        present = [a for a in names if a in state_dict]
        if not present:
            tied = f" (or its tied name{'s' if len(names) > 2 else ''} {', '.join(names[1:])})" if len(names) > 1 else ""
            raise CheckpointError(f"the state dict has no value for parameter {n!r}{tied}")
        t = state_dict[present[0]]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{present[0]!r} in the state dict is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(lay.shape):
            raise CheckpointError(f"{present[0]!r} has shape {list(t.shape)} in the state dict; this model's is "
                                  f"{list(lay.shape)}")
        for other in present[1:]:
            if not torch.equal(state_dict[other].to(t.device), t):
                raise CheckpointError(f"{present[0]!r} and {other!r} are one tied parameter but differ in the state dict")
        full[n] = t.detach().cpu()
    buffers: dict[str, torch.Tensor] = {}
    for k, b in sm._buffers_local.items():
        if k in state_dict:
            if tuple(state_dict[k].shape) != tuple(b.shape):
                raise CheckpointError(f"buffer {k!r} has shape {list(state_dict[k].shape)} in the state dict; this "
                                      f"model's is {list(b.shape)}")
            buffers[k] = state_dict[k]
    tp, my_tp = sm.mesh.size("tp"), sm.mesh.coord("tp")
    params = {}
    for n in sm._params:
        dim, blocks = _layout(sm.plan.params, n, tp)
        params[n] = shard_tensor(full[n], dim, tp, my_tp, blocks) if dim is not None else full[n]

    if sm.optimizer is not None:
        sm.optimizer.state.clear()
    sm.load_local_training_state({"params": params, "optim": {}, "optim_scalars": {}, "loss_scaler": None,
                                  "step": sm._steps, "skipped": sm._skipped, "rng": None})
    for k, v in buffers.items():
        sm._buffers_local[k].copy_(v.to(sm._buffers_local[k].device, sm._buffers_local[k].dtype))

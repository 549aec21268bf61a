"""Checkpoints: bitwise resume under one plan, resharding across plans and world sizes, bad input.

One launch per world size. The 4-rank launch trains 2 steps under one plan, saves, loads under
another plan and trains 3 more (contract 1 against the unmodified model); one of its checkpoints is
then loaded by the 2-rank launch, which also runs the same-plan resumes (bitwise), the corrupt,
truncated, incomplete and foreign checkpoints, a save that fails before its swap, and plain state
dict import.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist

import autoshard
from autoshard.runtime.checkpoint import export_state_dict, import_state_dict, read_manifest
from autoshard.runtime.errors import CheckpointError
from parity import GLOBAL_BATCH, LAYERS, SEQ, VOCAB, batch, check, inputs, make_model, make_optimizer, reference

pytestmark = pytest.mark.slow

SAVE_AT = 2  # steps before the checkpoint
# same plan: (model, mesh, options); 2 steps, save, 2 more == a fresh module loaded from the checkpoint, 2 steps
RESUME = [("llama", {"dp": 2}, {"zero": 1}), ("gpt2", {"tp": 2}, {}), ("gpt", {"pp": 2}, {"microbatches": 2}),
          ("gpt", {"dp": 2}, {"zero": 3})]
# across plans on 4 ranks: (model, saving mesh, options, loading mesh, options)
ACROSS = [
    ("gpt", {"tp": 2, "dp": 2}, {}, {"dp": 4}, {}),
    ("gpt2", {"pp": 2, "tp": 2}, {"microbatches": 2}, {"tp": 4}, {}),
    ("llama", {"dp": 4}, {"zero": 3}, {"dp": 2, "tp": 2}, {"zero": 1}),
]
# the 4-rank gpt checkpoint (tp=2 x dp=2, no ZeRO) loaded by 2 ranks
FOUR_TO_TWO = ({"dp": 2}, {"zero": 1})


# =============================================================================== launched workers
def _module(kind: str, degrees: dict, options: dict, model: torch.nn.Module | None = None):
    """A sharded module of a parity model, and the slice of each global batch this rank trains on."""
    mesh = autoshard.Mesh(**degrees)
    per = GLOBAL_BATCH // mesh.data_size
    rows = slice(mesh.data_rank * per, (mesh.data_rank + 1) * per)
    inp, _, loss_fn = inputs(kind, batch(0)[rows])
    sm = autoshard.autoshard(model if model is not None else make_model(kind), mesh, example_inputs=inp,
                             loss_fn=loss_fn, optimizer=make_optimizer("adamw"), **options)
    return sm, rows


def _train(sm, kind: str, rows: slice, steps: range) -> list[float]:
    return [sm.train_step(*inputs(kind, batch(s)[rows])[:2]) for s in steps]


def _same(a: dict, b: dict) -> list[str]:
    """Keys whose tensors are not bitwise equal."""
    return [k for k in a if not torch.equal(a[k], b[k])] + sorted(set(a) ^ set(b))


def _rank0_barrier(fn) -> None:
    """Rank 0 changes the files, the others wait."""
    if dist.get_rank() == 0:
        fn()
    dist.barrier()


def _resume(kind: str, degrees: dict, options: dict, path: str) -> tuple[dict, object, dict]:
    sm_a, rows = _module(kind, degrees, options)
    before = _train(sm_a, kind, rows, range(SAVE_AT))
    sm_a.save(path)
    saved = sm_a.full_state_dict()
    straight = _train(sm_a, kind, rows, range(SAVE_AT, 2 * SAVE_AT))
    sm_b, _ = _module(kind, degrees, options)
    autoshard.load(path, sm_b)
    steps_after_load = sm_b.stats()["steps"]
    resumed = _train(sm_b, kind, rows, range(SAVE_AT, 2 * SAVE_AT))
    return ({"before": before, "straight": straight, "resumed": resumed, "steps_after_load": steps_after_load,
             "differ": _same(sm_a.full_state_dict(), sm_b.full_state_dict())}, sm_b, saved)


def _try_load(sm, path: str) -> dict:
    """Load ``path``; report the error and whether the module changed."""
    before, steps = sm.full_state_dict(), sm.stats()["steps"]
    try:
        autoshard.load(path, sm)
        message = None
    except CheckpointError as e:
        message = str(e)
    return {"message": message, "changed": bool(_same(before, sm.full_state_dict())) or steps != sm.stats()["steps"]}


def _bad_inputs(sm, good: str, tmp: str) -> dict:
    """Variants of a pp=2 checkpoint (rank 0 reads rank-pp0-tp0.pt, rank 1 rank-pp1-tp0.pt) and foreign ones."""
    def variant(name: str, change) -> str:
        path = os.path.join(tmp, name)

        def make() -> None:
            shutil.copytree(good, path)
            change(path)
        _rank0_barrier(make)
        return path

    def truncate(p: str) -> None:
        f = os.path.join(p, "rank-pp1-tp0.pt")
        os.truncate(f, os.path.getsize(f) // 2)

    def flip_byte(p: str) -> None:  # same size: only the sha256 tells, and only rank 1 reads this file
        f = os.path.join(p, "rank-pp1-tp0.pt")
        with open(f, "r+b") as fh:
            fh.seek(os.path.getsize(f) // 2)
            b = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([b[0] ^ 0xFF]))

    def bump_version(p: str) -> None:
        m = os.path.join(p, "manifest.json")
        d = json.load(open(m))
        d["version"] = 99
        json.dump(d, open(m, "w"))

    out = {
        "truncated": variant("truncated", truncate),
        "corrupt": variant("corrupt", flip_byte),
        "missing": variant("missing", lambda p: os.remove(os.path.join(p, "rank-pp0-tp0.pt"))),
        "no_manifest": variant("no-manifest", lambda p: os.remove(os.path.join(p, "manifest.json"))),
        "version": variant("version", bump_version),
        "nonexistent": os.path.join(tmp, "never-saved"),
    }
    # the same names, another d_model
    from autoshard.examples.gpt import make_model as make_gpt

    other, _ = _module("gpt", {"dp": 2}, {}, make_gpt(vocab_size=VOCAB, seq_len=SEQ, d_model=32, n_heads=4, d_ff=128,
                                                      n_layers=LAYERS))
    out["other_model"] = os.path.join(tmp, "other-model")
    other.save(out["other_model"])
    return {k: _try_load(sm, p) for k, p in out.items()}


def _crash(sm, good: str, saved: dict, tmp: str) -> dict:
    """A save that fails after its shard files are written, before the swap, leaves the previous checkpoint."""
    path = os.path.join(tmp, "crash")
    _rank0_barrier(lambda: shutil.copytree(good, path))

    def digest() -> dict[str, str]:
        return {f: hashlib.sha256(open(os.path.join(path, f), "rb").read()).hexdigest() for f in sorted(os.listdir(path))}

    original = digest()
    real = os.rename
    out = {}
    for mode in ("swap_in", "every_rename"):  # the new directory cannot move in / nothing can move at all
        def failing(src, dst, *args, mode=mode, **kwargs):
            if mode == "every_rename" or ".tmp-" in os.fspath(src):
                raise OSError("simulated crash before the swap")
            return real(src, dst, *args, **kwargs)

        os.rename = failing
        try:
            sm.save(path)
            message = None
        except CheckpointError as e:
            message = str(e)
        finally:
            os.rename = real
        dist.barrier()
        out[mode] = {"message": message, "intact": digest() == original,
                     "leftovers": sorted(glob.glob(path + ".*"))}
    autoshard.load(path, sm)
    out["loads"] = not _same(saved, sm.full_state_dict())
    sm.save(path)  # and a save that succeeds replaces it
    out["replaced"] = {"step": read_manifest(path)["step"], "leftovers": sorted(glob.glob(path + ".*"))}
    return out


_OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")


def _no_pickles(fn):
    """Run ``fn`` with torch.distributed's object (pickling) collectives made to fail."""
    def refuse(*args, **kwargs):
        raise AssertionError("an object collective (pickle) was used")

    real = {n: getattr(dist, n) for n in _OBJECT_COLLECTIVES}
    for n in real:
        setattr(dist, n, refuse)
    try:
        return fn()
    finally:
        for n, f in real.items():
            setattr(dist, n, f)


def _listing(path: str) -> dict[str, str]:
    """Every file under ``path`` (relative name -> sha256)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


def _save_error(sm, path: str) -> str | None:
    try:
        sm.save(path)
    except CheckpointError as e:
        return str(e)
    return None


def _ownership(sm, good: str, saved: dict, tmp: str) -> dict:
    """pp=2 saves (two writer ranks) next to files autoshard did not write, with no object collective allowed."""
    out: dict = {}
    tmp = os.path.join(tmp, "ownership")  # kept leftovers stay out of the directory test_manifest_format checks
    web = os.path.join(tmp, "web")  # a project that has its own manifest.json

    def make_web() -> None:
        os.makedirs(os.path.join(web, "src"))
        os.makedirs(os.path.join(web, "data"))
        json.dump({"name": "my-app", "version": "1.0.0"}, open(os.path.join(web, "manifest.json"), "w"))
        open(os.path.join(web, "src", "app.js"), "w").write("console.log(1)")
        open(os.path.join(web, "data", "rows.csv"), "w").write("a,b\n1,2\n")
    _rank0_barrier(make_web)
    before = _listing(web)
    out["web"] = {"message": _no_pickles(lambda: _save_error(sm, web))}
    dist.barrier()
    out["web"]["unchanged"] = _listing(web) == before
    out["web"]["leftovers"] = sorted(glob.glob(web + ".*"))

    clash = os.path.join(tmp, "clash")  # a checkpoint whose manifest does not list a name the new save writes

    def make_clash() -> None:
        shutil.copytree(good, clash)
        m = os.path.join(clash, "manifest.json")
        d = json.load(open(m))
        d["files"] = [f for f in d["files"] if f["file"] != "rank-pp1-tp0.pt"]
        json.dump(d, open(m, "w"))
    _rank0_barrier(make_clash)
    before = _listing(clash)
    out["clash"] = {"message": _no_pickles(lambda: _save_error(sm, clash))}
    dist.barrier()
    out["clash"]["unchanged"] = _listing(clash) == before

    own = os.path.join(tmp, "own")  # a checkpoint the user keeps a tokenizer and logs in, and killed saves
    _no_pickles(lambda: sm.save(own))

    def add_files() -> None:
        open(os.path.join(own, "tokenizer.json"), "w").write('{"vocab": 128}')
        os.makedirs(os.path.join(own, "logs"))
        open(os.path.join(own, "logs", "train.log"), "w").write("step 2\n")
        for token, files in (("0123abcd", ["rank-pp0-tp0.pt"]), ("89abcdef", ["rank-pp0-tp0.pt", "manifest.json"]),
                             ("deadbeef", ["notes.txt"])):
            os.makedirs(f"{own}.tmp-{token}")
            for f in files:
                open(os.path.join(f"{own}.tmp-{token}", f), "wb").write(b"partial")
    _rank0_barrier(add_files)
    user = {k: v for k, v in _listing(own).items() if k in ("tokenizer.json", os.path.join("logs", "train.log"))}
    out["own"] = {"message": _no_pickles(lambda: _save_error(sm, own))}
    dist.barrier()
    after = _listing(own)
    out["own"]["user_kept"] = len(user) == 2 and all(after.get(k) == v for k, v in user.items())
    out["own"]["entries"] = sorted(os.listdir(own))
    out["own"]["leftovers"] = sorted(os.path.basename(p) for p in glob.glob(own + ".*"))
    _no_pickles(lambda: autoshard.load(own, sm))
    out["own"]["loads"] = not _same(saved, sm.full_state_dict())
    return out


def _import(sm) -> dict:
    """Plain state dicts into a tp=2 GPT-2 (tied wte / lm_head, fused qkv)."""
    fresh = make_model("gpt2").state_dict()
    import_state_dict(sm, fresh)
    # states reset as for a fresh optimizer: none, or (the step program keeps its tensors) all zero
    live = [st for st in sm.optimizer.state.values()
            if any(isinstance(v, torch.Tensor) and bool(v.ne(0).any()) for v in st.values())]
    out = {"differ": _same(fresh, sm.full_state_dict()), "optimizer_states": len(live)}
    one_name = {k: v for k, v in fresh.items() if k != "lm_head.weight"}
    import_state_dict(sm, one_name)
    out["one_tied_name_differ"] = _same(fresh, sm.full_state_dict())
    w = "transformer.h.0.attn.c_attn.weight"
    bad = {
        "missing": {k: v for k, v in fresh.items() if k != w},
        "unexpected": {**fresh, "transformer.h.9.mlp.c_fc.weight": torch.zeros(1)},
        "shape": {**fresh, w: fresh[w][:, :96]},
    }
    out["errors"] = {}
    before = sm.full_state_dict()
    for name, sd in bad.items():
        try:
            import_state_dict(sm, sd)
            out["errors"][name] = None
        except CheckpointError as e:
            out["errors"][name] = str(e)
    out["unchanged_after_errors"] = not _same(before, sm.full_state_dict())
    return out


def _four_to_two(path: str) -> dict:
    sm, rows = _module("gpt", *FOUR_TO_TWO)
    autoshard.load(path, sm)
    losses = _train(sm, "gpt", rows, range(SAVE_AT, 5))
    return {"losses": losses, "state": sm.full_state_dict(), "steps": sm.stats()["steps"]}


def _key(kind: str, options: dict) -> str:
    return kind + ("-zero3" if options.get("zero") == 3 else "")


def _world2(tmp: str) -> dict:
    out, modules, saved = {"resume": {}}, {}, {}
    for kind, degrees, options in RESUME:
        key = _key(kind, options)
        out["resume"][key], modules[key], saved[key] = _resume(kind, degrees, options,
                                                               os.path.join(tmp, f"resume-{key}"))
    out["bad"] = _bad_inputs(modules["gpt"], os.path.join(tmp, "resume-gpt"), tmp)
    out["crash"] = _crash(modules["gpt"], os.path.join(tmp, "resume-gpt"), saved["gpt"], tmp)
    out["ownership"] = _ownership(modules["gpt"], os.path.join(tmp, "resume-gpt"), saved["gpt"], tmp)
    out["import"] = _import(modules["gpt2"])
    four = _four_to_two(os.path.join(tmp, "across-gpt"))
    if dist.get_rank() == 0:
        out["four_to_two"] = four
    return out


def _world4(tmp: str) -> list[dict | None]:
    out = []
    for kind, deg_a, opt_a, deg_b, opt_b in ACROSS:
        path = os.path.join(tmp, f"across-{kind}")
        sm_a, rows = _module(kind, deg_a, opt_a)
        losses = _train(sm_a, kind, rows, range(SAVE_AT))
        sm_a.save(path)
        sm_b, rows = _module(kind, deg_b, opt_b)
        autoshard.load(path, sm_b)
        losses += _train(sm_b, kind, rows, range(SAVE_AT, 5))
        sd = sm_b.full_state_dict()
        out.append({"losses": losses, "state": sd} if dist.get_rank() == 0 else None)
    return out


# =============================================================================== fixtures
@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def world4(tmp):
    return autoshard.launch(_world4, 4, tmp, device="cpu")[0]


@pytest.fixture(scope="module")
def world2(tmp, world4):  # loads a checkpoint the 4-rank launch wrote
    return autoshard.launch(_world2, 2, tmp, device="cpu")


@functools.cache
def _ref(kind: str):
    return reference(kind, "adamw")


# =============================================================================== same plan: bitwise
@pytest.mark.parametrize("case", RESUME, ids=lambda c: f"{c[0]}-{'x'.join(f'{k}{v}' for k, v in c[1].items())}")
def test_resume_is_bitwise(world2, case):
    for rank_result in world2:
        r = rank_result["resume"][_key(case[0], case[2])]
        assert r["steps_after_load"] == SAVE_AT
        assert r["resumed"] == r["straight"]  # identical floats
        assert r["differ"] == []  # torch.equal on every tensor of the state dict


def test_manifest_format(world2, tmp):
    path = os.path.join(tmp, "resume-gpt")
    m = read_manifest(path)
    assert m["version"] == 1 and m["step"] == SAVE_AT and m["optimizer"] == "AdamW"
    assert m["mesh"]["pp"] == 2 and m["plan"]["pipeline"]["stages"]
    assert [f["file"] for f in m["files"]] == ["rank-pp0-tp0.pt", "rank-pp1-tp0.pt"]
    for f in m["files"]:
        data = open(os.path.join(path, f["file"]), "rb").read()
        assert len(data) == f["bytes"] and hashlib.sha256(data).hexdigest() == f["sha256"]
    assert m["params"]["blocks.0.attn.qkv.weight"] == [192, 64]
    # one writer per (pp, tp): dp=2 with ZeRO writes one file, tp=2 two
    assert [f["file"] for f in read_manifest(os.path.join(tmp, "resume-llama"))["files"]] == ["rank-pp0-tp0.pt"]
    assert len(read_manifest(os.path.join(tmp, "resume-gpt2"))["files"]) == 2
    assert not glob.glob(os.path.join(tmp, "*.tmp-*")) and not glob.glob(os.path.join(tmp, "*.old-*"))


# =============================================================================== across plans
@pytest.mark.parametrize("i", range(len(ACROSS)), ids=[f"{c[0]}-{c[1]}-to-{c[3]}" for c in ACROSS])
def test_reshard_across_plans(world4, i):
    kind = ACROSS[i][0]
    check(world4[i], _ref(kind), "adamw")


def test_four_ranks_to_two(world2):
    r = world2[0]["four_to_two"]
    ref_losses, ref_state = _ref("gpt")
    assert r["steps"] == 5
    check({"losses": r["losses"], "state": r["state"]}, (ref_losses[SAVE_AT:], ref_state), "adamw")


# =============================================================================== bad input
EXPECTED = {
    "truncated": ["truncated", "rank-pp1-tp0.pt"],
    "corrupt": ["corrupt", "sha256", "rank-pp1-tp0.pt"],
    "missing": ["incomplete", "rank-pp0-tp0.pt is missing"],
    "no_manifest": ["no manifest.json"],
    "version": ["version 99"],
    "nonexistent": ["no checkpoint at", "never-saved"],
    "other_model": ["different model", "parameter 'head.weight' has shape [128, 32] there and [128, 64] here"],
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_bad_checkpoint_raises_on_every_rank_and_changes_nothing(world2, name):
    messages = [r["bad"][name]["message"] for r in world2]
    assert messages[0] is not None and messages[0] == messages[1]  # every rank raises the same error
    for part in EXPECTED[name]:
        assert part in messages[0], messages[0]
    assert not any(r["bad"][name]["changed"] for r in world2)


def test_failed_save_keeps_the_previous_checkpoint(world2):
    for r in world2:
        c = r["crash"]
        for mode in ("swap_in", "every_rename"):
            assert "simulated crash" in c[mode]["message"] and "unchanged" in c[mode]["message"]
            assert c[mode]["intact"] and c[mode]["leftovers"] == []
        assert c["loads"]
        assert c["replaced"]["step"] == SAVE_AT and c["replaced"]["leftovers"] == []  # the loaded step


# =============================================================================== what a save may replace
def test_save_replaces_only_what_autoshard_wrote_on_every_rank(world2):
    """pp=2, two writers: a foreign directory is refused (all ranks, nothing touched); a checkpoint keeps the
    user's files; stale temp directories of killed saves go, only autoshard's; no pickles cross ranks."""
    web = [r["ownership"]["web"] for r in world2]
    assert web[0]["message"] is not None and web[0]["message"] == web[1]["message"]
    assert "web is a non-empty directory that autoshard cannot prove it wrote" in web[0]["message"]
    assert all(w["unchanged"] and w["leftovers"] == [] for w in web)
    clash = [r["ownership"]["clash"] for r in world2]
    assert clash[0]["message"] == clash[1]["message"] and "clash/rank-pp1-tp0.pt was not written" in clash[0]["message"]
    assert all(c["unchanged"] for c in clash)
    for r in world2:
        own = r["ownership"]["own"]
        assert own["message"] is None and own["user_kept"] and own["loads"]
        assert own["entries"] == ["logs", "manifest.json", "rank-pp0-tp0.pt", "rank-pp1-tp0.pt", "tokenizer.json"]
        assert own["leftovers"] == ["own.tmp-deadbeef"]  # holds a file autoshard does not write: kept


def test_checkpoint_module_uses_no_object_collectives():
    import inspect

    from autoshard.runtime import checkpoint

    text = inspect.getsource(checkpoint)
    for name in _OBJECT_COLLECTIVES:
        assert name not in text, name


def test_save_refuses_what_it_did_not_write(tmp):
    """One process: a web project with its own manifest.json, a plain directory, a file: errors, nothing touched."""
    sm, _ = _module("gpt", {}, {})
    tmp = os.path.join(tmp, "ownership-single")
    web = os.path.join(tmp, "web-single")
    os.makedirs(os.path.join(web, "src"))
    os.makedirs(os.path.join(web, "data"))
    json.dump({"name": "my-app"}, open(os.path.join(web, "manifest.json"), "w"))
    open(os.path.join(web, "src", "index.html"), "w").write("<p>hi</p>")
    open(os.path.join(web, "data", "rows.csv"), "w").write("1,2\n")
    plain = os.path.join(tmp, "plain-single")
    os.makedirs(plain)
    open(os.path.join(plain, "notes.txt"), "w").write("mine")
    afile = os.path.join(tmp, "a-file")
    open(afile, "w").write("mine")
    for path, why in ((web, "is not an autoshard checkpoint manifest"), (plain, "has no manifest.json"),
                      (afile, "is not a directory")):
        before = _listing(path) if os.path.isdir(path) else open(path).read()
        with pytest.raises(CheckpointError, match="refusing to replace") as e:
            sm.save(path)
        assert path in str(e.value) and why in str(e.value)
        assert (_listing(path) if os.path.isdir(path) else open(path).read()) == before
        assert glob.glob(path + ".*") == []
    empty = os.path.join(tmp, "empty-single")
    os.makedirs(empty)
    sm.save(empty)  # an empty directory holds nothing to lose
    assert read_manifest(empty)["step"] == 0


def test_save_keeps_user_files_and_cleans_stale_temp_dirs(tmp):
    """One process: files the manifest does not list survive a save over the checkpoint; killed saves' temp
    directories are deleted by the next successful save, unless they hold anything autoshard does not write."""
    path = os.path.join(tmp, "ownership-single", "keep-single")
    sm, rows = _module("gpt", {}, {})
    sm.save(path)
    open(os.path.join(path, "tokenizer.json"), "w").write('{"vocab": 128}')
    os.makedirs(os.path.join(path, "logs"))
    open(os.path.join(path, "logs", "train.log"), "w").write("step 0\n")
    stale = {"0123abcd": ["rank-pp0-tp0.pt"], "89abcdef": ["rank-pp0-tp0.pt", "manifest.json"], "deadbeef": ["own.txt"],
             "0000000g": ["rank-pp0-tp0.pt"]}  # the last is no token of autoshard's
    for token, files in stale.items():
        os.makedirs(f"{path}.tmp-{token}")
        for f in files:
            open(os.path.join(f"{path}.tmp-{token}", f), "wb").write(b"partial")
    _train(sm, "gpt", rows, range(1))
    sm.save(path)
    assert read_manifest(path)["step"] == 1
    assert open(os.path.join(path, "tokenizer.json")).read() == '{"vocab": 128}'
    assert open(os.path.join(path, "logs", "train.log")).read() == "step 0\n"
    assert sorted(os.listdir(path)) == ["logs", "manifest.json", "rank-pp0-tp0.pt", "tokenizer.json"]
    assert sorted(os.path.basename(p) for p in glob.glob(path + ".*")) == ["keep-single.tmp-0000000g",
                                                                          "keep-single.tmp-deadbeef"]
    fresh, _ = _module("gpt", {}, {})
    autoshard.load(path, fresh)
    assert _same(export_state_dict(sm), export_state_dict(fresh)) == []



def test_user_files_that_cannot_move_are_kept_and_named(tmp, monkeypatch):
    """If a file of the user's cannot move into the new checkpoint, nothing of the old directory is deleted."""
    path = os.path.join(tmp, "ownership-single", "stuck-user")
    sm, _ = _module("gpt", {}, {})
    sm.save(path)
    open(os.path.join(path, "tokenizer.json"), "w").write("{}")
    real = os.rename
    monkeypatch.setattr(os, "rename", lambda src, dst: _raise(OSError("busy")) if src.endswith("tokenizer.json")
                        else real(src, dst))
    with pytest.raises(CheckpointError, match=r"is saved, but 1 file\(s\) of yours .*'tokenizer.json'.*stuck-user.old-"):
        sm.save(path)
    monkeypatch.undo()
    old = glob.glob(path + ".old-*")
    assert len(old) == 1 and open(os.path.join(old[0], "tokenizer.json")).read() == "{}"
    read_manifest(path)  # the new checkpoint is in place
    read_manifest(old[0])  # and the old one whole, beside it


def test_manifest_cannot_name_a_file_outside_the_checkpoint(tmp):
    """A manifest that lists a path outside the checkpoint is refused before anything is opened."""
    path = os.path.join(tmp, "ownership-single", "escape")
    sm, _ = _module("gpt", {}, {})
    sm.save(path)
    m = os.path.join(path, "manifest.json")
    d = json.load(open(m))
    d["files"][0]["file"] = "../outside.pt"
    json.dump(d, open(m, "w"))
    with pytest.raises(CheckpointError, match="corrupt: it lists '../outside.pt'"):
        autoshard.load(path, sm)


# =============================================================================== plain state dicts
def test_import_state_dict(world2):
    for r in world2:
        imp = r["import"]
        assert imp["differ"] == [] and imp["one_tied_name_differ"] == []
        assert imp["optimizer_states"] == 0
        errors = imp["errors"]
        assert "no value for parameter 'transformer.h.0.attn.c_attn.weight'" in errors["missing"]
        assert "'transformer.h.9.mlp.c_fc.weight'" in errors["unexpected"]
        assert "shape [64, 96]" in errors["shape"] and "[64, 192]" in errors["shape"]
        assert imp["unchanged_after_errors"]


# =============================================================================== one process
def test_single_process_round_trip(tmp):
    """Without a process group (``Mesh()``): save twice to one path, load, and go on identically."""
    path = os.path.join(tmp, "single")
    sm, rows = _module("gpt", {}, {})
    _train(sm, "gpt", rows, range(1))
    sm.save(path)
    _train(sm, "gpt", rows, range(1, 2))
    sm.save(path)  # replaces the first
    assert read_manifest(path)["step"] == 2 and not glob.glob(path + ".*")
    fresh, _ = _module("gpt", {}, {})
    autoshard.load(path, fresh)
    assert _same(export_state_dict(sm), export_state_dict(fresh)) == []
    for n, p in sm.local_parameters().items():
        mine, theirs = sm.optimizer.state[p], fresh.optimizer.state[fresh.local_parameters()[n]]
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert _train(sm, "gpt", rows, range(2, 3)) == _train(fresh, "gpt", rows, range(2, 3))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        autoshard.load(os.path.join(tmp, "nowhere"), fresh)


def test_swap_that_cannot_roll_back_keeps_both(tmp, monkeypatch):
    """The previous checkpoint moved aside, the new one cannot move in nor the old one back: both stay, named."""
    path = os.path.join(tmp, "stuck")
    sm, rows = _module("gpt", {}, {})
    sm.save(path)
    real = os.rename
    monkeypatch.setattr(os, "rename", lambda src, dst: real(src, dst) if src == path else _raise(OSError("disk gone")))
    with pytest.raises(CheckpointError, match="previous checkpoint is at .*stuck.old-.* and the new, complete one at"):
        sm.save(path)
    monkeypatch.undo()
    assert not os.path.exists(path)
    with pytest.raises(CheckpointError, match="rename it to"):  # load points at the checkpoint moved aside
        autoshard.load(path, sm)
    for leftover in glob.glob(path + ".*"):
        read_manifest(leftover)  # both complete


def _raise(e: Exception):
    raise e

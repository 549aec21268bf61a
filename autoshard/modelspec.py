"""Command-line specs: which model, what example inputs, which mesh.

The ``viz`` and ``check`` commands plan a model given as text, so three small languages are parsed
here, each failing with a :class:`ValueError` that shows the expected form:

* a model: ``path/to/file.py:name`` or ``package.module:name``, where ``name`` is an ``nn.Module``
  class, a function returning a module, or a module instance; an optional call with literal
  arguments passes them on (``autoshard.examples.gpt:make_model(n_layers=32)``);
* inputs: ``int64[8,1024]``, several separated by top-level commas (``int64[2,16],float32[2,16]``),
  optionally named for keyword inputs (``input_ids=int64[2,16]``). Integer inputs are random ids in
  ``[0, vocab)`` with ``vocab`` read from the model's ``config.vocab_size`` or ``cfg.vocab_size``
  (token ids must index the embedding), else 0 or 1; floating inputs are standard normal;
* a mesh: ``dp=2,tp=2,pp=2``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from typing import Any

import torch

MESH_DIMS: tuple[str, ...] = ("pp", "dp", "ep", "tp")

_MODEL_RE = re.compile(r"^(?P<src>.+?\.py|[A-Za-z_][\w.]*):(?P<obj>[A-Za-z_][\w.]*)(?P<call>\(.*\))?$", re.DOTALL)
_INPUT_RE = re.compile(r"^(?:(?P<name>[A-Za-z_]\w*)\s*=\s*)?(?P<dtype>[A-Za-z_]\w*)\s*\[(?P<dims>[^\[\]]*)\]$")

MODEL_FORM = ("path/to/file.py:name or package.module:name (a nn.Module class, a function returning one, or a "
              "module instance; optionally called with literal arguments, e.g. pkg.mod:make_model(n_layers=4))")
INPUT_FORM = "DTYPE[d0,d1,...], comma-separated for several inputs, NAME=DTYPE[...] for keyword inputs " \
             "(e.g. 'int64[8,1024]' or 'input_ids=int64[2,16],attention_mask=int64[2,16]')"
MESH_FORM = "DIM=N[,DIM=N...] with DIM one of pp, dp, ep, tp (e.g. 'dp=2,tp=2' or 'pp=2,tp=2')"


# ============================================================================== models
def _parse_call(text: str, spec: str) -> tuple[list[Any], dict[str, Any]]:
    """Literal positional and keyword arguments of ``(…)`` in a model spec."""
    try:
        call = ast.parse(f"f{text}", mode="eval").body
        if not isinstance(call, ast.Call):
            raise SyntaxError("not a call")
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {}
        for k in call.keywords:
            if k.arg is None:
                raise SyntaxError("**kwargs")
            kwargs[k.arg] = ast.literal_eval(k.value)
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"model {spec!r}: the arguments {text} must be Python literals, e.g. "
                         f"make_model(n_layers=4, name='x') ({e})") from None
    return args, kwargs


def _import_file(path: str, spec: str) -> Any:
    """Import a Python file as a module registered in ``sys.modules`` (dataclasses and pickling need that)."""
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise ValueError(f"model {spec!r}: no such file {path!r}; expected {MODEL_FORM}")
    digest = hashlib.sha1(full.encode()).hexdigest()[:8]
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
    name = f"autoshard_model_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    folder = os.path.dirname(full)
    if folder not in sys.path:  # sibling imports of the model file
        sys.path.insert(0, folder)
    ispec = importlib.util.spec_from_file_location(name, full)
    if ispec is None or ispec.loader is None:
        raise ValueError(f"model {spec!r}: cannot import {path!r} as Python")
    module = importlib.util.module_from_spec(ispec)
    sys.modules[name] = module
    try:
        ispec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ValueError(f"model {spec!r}: importing {path} raised {type(e).__name__}: {e}") from e
    return module


def load_object(spec: str) -> tuple[Any, list[Any] | None, dict[str, Any]]:
    """Resolve ``source:name[(args)]`` to the named object, and the call arguments if any were given."""
    m = _MODEL_RE.match(spec.strip())
    if m is None:
        raise ValueError(f"{spec!r} is not a model spec; expected {MODEL_FORM}")
    src, obj_path, call = m.group("src"), m.group("obj"), m.group("call")
    if src.endswith(".py"):
        module = _import_file(src, spec)
    else:
        try:
            module = importlib.import_module(src)
        except ImportError as e:
            raise ValueError(f"model {spec!r}: cannot import {src!r} ({e}); expected {MODEL_FORM}") from None
        except Exception as e:
            raise ValueError(f"model {spec!r}: importing {src} raised {type(e).__name__}: {e}") from e
    obj: Any = module
    for part in obj_path.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(module) if not n.startswith("_"))
            raise ValueError(f"model {spec!r}: {src} has no attribute {obj_path!r} (it defines: "
                             f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''})")
        obj = getattr(obj, part)
    args, kwargs = _parse_call(call, spec) if call else (None, {})
    return obj, args, kwargs


def load_model(spec: str) -> torch.nn.Module:
    """The ``nn.Module`` a spec names: a class instantiated, a factory called, or an instance as is."""
    obj, args, kwargs = load_object(spec)
    if isinstance(obj, torch.nn.Module):
        if args is not None:
            raise ValueError(f"model {spec!r}: names a module instance, which cannot be called with arguments")
        return obj
    if not callable(obj):
        raise ValueError(f"model {spec!r} is a {type(obj).__name__}, not a nn.Module class, a function returning "
                         "a module, or a module")
    try:
        model = obj(*(args or []), **kwargs)
    except Exception as e:
        raise ValueError(f"model {spec!r}: calling it raised {type(e).__name__}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def model_vocab(model: torch.nn.Module) -> int | None:
    """``config.vocab_size`` (Hugging Face) or ``cfg.vocab_size`` of a model, when it has one."""
    for holder in ("config", "cfg"):
        v = getattr(getattr(model, holder, None), "vocab_size", None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


# ============================================================================== inputs
def split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: ``'a[1,2],b[3]'`` → ``['a[1,2]', 'b[3]']``."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"--input {text!r}: unbalanced ']'; expected {INPUT_FORM}")
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"--input {text!r}: unbalanced '['; expected {INPUT_FORM}")
    parts.append("".join(cur).strip())
    return parts


def _dtype(name: str, item: str) -> torch.dtype:
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"--input {item!r}: {name!r} is not a torch dtype (e.g. int64, float32, bfloat16, bool)")
    if d.is_complex:
        raise ValueError(f"--input {item!r}: complex inputs are not supported")
    return d


def parse_input_specs(text: str) -> list[tuple[str | None, torch.dtype, tuple[int, ...]]]:
    """``'int64[2,16],mask=bool[2,16]'`` → ``[(None, torch.int64, (2, 16)), ('mask', torch.bool, (2, 16))]``."""
    if not text or not text.strip():
        raise ValueError(f"--input is empty; expected {INPUT_FORM}")
    out: list[tuple[str | None, torch.dtype, tuple[int, ...]]] = []
    names: set[str] = set()
    for item in split_top_level(text):
        m = _INPUT_RE.match(item)
        if m is None:
            whole = f" (in {text!r})" if item != text.strip() else ""
            raise ValueError(f"--input {item!r}{whole} is not {INPUT_FORM}")
        dims_text = m.group("dims").strip()
        try:
            dims = tuple(int(d) for d in dims_text.split(",")) if dims_text else ()
        except ValueError:
            raise ValueError(f"--input {item!r}: the shape must be integers, e.g. int64[8,1024]") from None
        if any(d < 1 for d in dims):
            raise ValueError(f"--input {item!r}: every dimension must be >= 1")
        name = m.group("name")
        if name is None and names:
            raise ValueError(f"--input {item!r}: positional inputs must come before named ones")
        if name is not None:
            if name in names:
                raise ValueError(f"--input: {name!r} is given twice")
            names.add(name)
        out.append((name, _dtype(m.group("dtype"), item), dims))
    return out


def make_inputs(text: str, model: torch.nn.Module | None = None,
                seed: int = 0) -> tuple[tuple, dict[str, torch.Tensor]]:
    """Example tensors for ``--input``: (positional inputs, keyword inputs).

    Integer inputs are ids in ``[0, vocab)`` (vocab from the model, see :func:`model_vocab`), else 0 or 1,
    so that embeddings are indexed in range; floating inputs are standard normal. Seeded: the same spec
    gives the same tensors.
    """
    specs = parse_input_specs(text)
    vocab = (model_vocab(model) if model is not None else None) or 2
    g = torch.Generator().manual_seed(seed)
    args: list[torch.Tensor] = []
    kwargs: dict[str, torch.Tensor] = {}
    for name, dtype, dims in specs:
        if dtype == torch.bool:
            t = torch.randint(0, 2, dims, generator=g).bool()
        elif dtype.is_floating_point:
            t = torch.randn(dims, generator=g).to(dtype)
        else:
            t = torch.randint(0, vocab, dims, generator=g).to(dtype)
        if name is None:
            args.append(t)
        else:
            kwargs[name] = t
    return tuple(args), kwargs


# ============================================================================== mesh
def parse_mesh(text: str) -> dict[str, int]:
    """``'dp=2,tp=2'`` → ``{'dp': 2, 'tp': 2}``; every degree a positive integer, each dimension once."""
    if not text or not text.strip():
        raise ValueError(f"--mesh is empty; expected {MESH_FORM}")
    out: dict[str, int] = {}
    for item in text.split(","):
        key, eq, value = item.strip().partition("=")
        key = key.strip()
        if not eq or key not in MESH_DIMS:
            raise ValueError(f"--mesh {text!r}: {item.strip()!r} is not DIM=N; expected {MESH_FORM}")
        try:
            n = int(value.strip())
        except ValueError:
            raise ValueError(f"--mesh {text!r}: {key}={value.strip()!r} is not an integer") from None
        if n < 1:
            raise ValueError(f"--mesh {text!r}: {key}={n} must be >= 1")
        if key in out:
            raise ValueError(f"--mesh {text!r}: {key} is given twice")
        out[key] = n
    return out

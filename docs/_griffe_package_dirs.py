"""A griffe extension for the API reference: ``autoshard.runtime``, ``autoshard.passes`` and ``autoshard.examples``
live in ``runtime/``, ``passes/`` and ``examples/`` (setuptools ``package-dir``), where a static reader of
``autoshard/`` does not look. Load each from its folder and attach it under the ``autoshard`` package."""

from __future__ import annotations

import os
from typing import Any

import griffe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPACKAGES = ("runtime", "passes", "examples")


class PackageDirs(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "autoshard":
            return
        for name in SUBPACKAGES:
            sub = griffe.GriffeLoader(search_paths=[ROOT], docstring_parser=loader.docstring_parser,
                                      docstring_options=loader.docstring_options).load(name)
            pkg.set_member(name, sub)

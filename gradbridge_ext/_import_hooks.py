"""Run a function once a module is imported: at once if it already is, else right after it loads.

What only torch.compile or DTensor needs (torch._dynamo, torch.distributed.tensor)
is slow to import, more than ``import gradbridge_ext`` may add to
``import torch``; so bridge's rules for them are registered when those modules
are imported, by a finder on ``sys.meta_path`` that wraps the module's loader
(a post-import hook written with importlib's public API). It watches only the
names given to :func:`when_imported`, and removes itself once none is left.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

# The modules being watched, each with what to run once it has loaded.
_pending: dict[str, list[Callable[[], None]]] = {}


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` now if module ``name`` is loaded, else right after it loads."""
    if name in sys.modules:
        callback()
        return
    _pending.setdefault(name, []).append(callback)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def is_watching(name: str) -> bool:
    return name in _pending and _finder in sys.meta_path


class _RunAfterLoading(importlib.abc.Loader):
    """Runs a watched module's real loader, then the callbacks waiting for it."""

    def __init__(self, name: str, loader: importlib.abc.Loader) -> None:
        self.name, self.loader = name, loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package ... while the module runs
        return getattr(self.loader, name)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self.loader.exec_module(module)
        except BaseException:
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)  # watch the next try
            raise
        # The spec keeps the real loader, for reloads and for whoever reads it.
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        module.__loader__ = self.loader
        for callback in _pending.pop(self.name, []):
            callback()


class _WrapWatchedLoaders(importlib.abc.MetaPathFinder):
    """Finds a watched module with the other finders, and wraps its loader."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in _pending:
            return None
        sys.meta_path.remove(self)  # the other finders find it (a failed import puts it back)
        spec = None
        try:
            for finder in sys.meta_path:
                find_spec = getattr(finder, "find_spec", None)
                spec = find_spec(name, path, target) if find_spec is not None else None
                if spec is not None:
                    break
        finally:
            if set(_pending) - {name}:
                sys.meta_path.insert(0, self)  # others are still awaited
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RunAfterLoading(name, spec.loader)
        return spec


_finder = _WrapWatchedLoaders()

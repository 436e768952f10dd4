"""Drop sites attached with module hooks, for networks that torch.fx cannot trace.

A site here acts on one call of one submodule: on its output ("after"), on its first input
("before"), or in place of a dropout submodule ("replace", the dropout is swapped for an identity).
Calls are counted from 1 within each forward pass of the whole network, so a module called three
times can carry three different sites.

It needs only torch: autodrop's export copies everything below the marker into the file it
writes (with the imports above it), so that the exported network runs without autodrop.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# --- exported runtime: everything below is copied into exported models ---


class SiteCallHooks:
    """Runs site modules at chosen calls of a network's submodules, through forward hooks."""

    def __init__(self, model: nn.Module, entries: Sequence[tuple[str, str, int, nn.Module]]) -> None:
        """Attach ``entries``, each (where, submodule path, call number, site module), to ``model``."""
        self.entries = list(entries)
        self.counts: dict[str, int] = {}
        by_path: dict[str, list[tuple[str, int, nn.Module]]] = {}
        for where, path, call, site in entries:
            if where not in ("after", "before", "replace"):
                raise ValueError(f"where must be after, before or replace, but got {where=}.")
            by_path.setdefault(path, []).append((where, call, site))
        for path, items in by_path.items():
            if any(where == "replace" for where, _, _ in items):
                _swap_for_identity(model, path)
            module = model.get_submodule(path)
            module.register_forward_pre_hook(_BeforeCall(self, path, items))
            module.register_forward_hook(_AfterCall(self, path, items))
        model.register_forward_pre_hook(_ResetCounts(self))


class _ResetCounts:
    def __init__(self, owner: SiteCallHooks) -> None:
        self.owner = owner

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.owner.counts.clear()


class _BeforeCall:
    def __init__(self, owner: SiteCallHooks, path: str, items: list[tuple[str, int, nn.Module]]) -> None:
        self.owner, self.path, self.items = owner, path, items

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        call = self.owner.counts.get(self.path, 0) + 1
        self.owner.counts[self.path] = call
        for where, at, site in self.items:
            if where == "before" and at == call and args and isinstance(args[0], torch.Tensor):
                return (site(args[0]),) + tuple(args[1:])
        return None


class _AfterCall:
    def __init__(self, owner: SiteCallHooks, path: str, items: list[tuple[str, int, nn.Module]]) -> None:
        self.owner, self.path, self.items = owner, path, items

    def __call__(self, module: nn.Module, args: tuple, output: object) -> object:
        call = self.owner.counts.get(self.path, 0)
        for where, at, site in self.items:
            if where in ("after", "replace") and at == call and isinstance(output, torch.Tensor):
                return site(output)
        return None


def _swap_for_identity(model: nn.Module, path: str) -> None:
    """Replace the dropout at ``path`` (and every other name it goes by) with an identity."""
    old = model.get_submodule(path)
    identity = nn.Identity()  # one object, so calls under any of its names count together
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if module is old and name:
            parent_path, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, attr, identity)

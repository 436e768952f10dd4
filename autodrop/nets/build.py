"""Build any network autodrop searches, with a DropSite at each candidate site, all off.

``build_model`` builds a built-in model from its registry entry (autodrop/nets/builtin.py) or a
user's network (``FILE.py:Name``, ``package.module:Name``, ``torchvision:NAME``): nets/user.py
constructs it and nets/discovery.py puts DropSites at its candidate sites, so the rest of autodrop
treats every network alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from autodrop.config import SearchConfig, is_user_model, parse_model_spec
from autodrop.errors import ModelError
from autodrop.nets.builtin import get_builtin
from autodrop.nets.discovery import Discovery, SiteInfo, discovery_of, insert_sites
from autodrop.nets.packed import packing_problem
from autodrop.nets.shape import ModelShape
from autodrop.nets.sites import (
    BRANCH,
    IN_BLOCK_PREFIX,
    BranchDrop,
    DropSite,
    branch_sites,
    iter_sites,
    site_kinds,
    site_slots,
)
from autodrop.nets.user import build_user_model, check_torchvision_name, load_target


@dataclass(frozen=True)
class ModelSites:
    """What a search needs to know about a network before its first trial."""

    kinds: dict[str, str]  # site -> "conv" or "fc", in forward order
    slots: dict[str, tuple[str, ...]]  # the slots of sites declared in more than one
    packing_problem: str | None  # why the network's trials cannot be packed, or None if they can
    branches: frozenset[str] = frozenset()  # sites after a residual sum (their "branch" kind drops the branch)
    in_block: bool = False  # whether the network has sites inside repeated blocks


def check_model(name: str, model_args: Mapping[str, Any] | None = None) -> None:
    """Raise ModelError if ``name`` is neither a built-in model nor a user model that can be found.

    Cheap: a user model's file or module is imported, nothing is built.
    """
    if not is_user_model(name):
        entry = get_builtin(name)
        if model_args and not entry.arguments:
            raise ModelError(
                f"--model-arg is for your own models (FILE.py:Name, package.module:Name, torchvision:NAME); "
                f"built-in model {name!r} takes none, but got {', '.join(model_args)}."
            )
        entry.checked_arguments(name, model_args or {})
        return
    spec = parse_model_spec(name)
    if spec.form == "torchvision":
        check_torchvision_name(spec.source)
    else:
        load_target(spec)


def build_model(name: str, shape: ModelShape, *, model_args: Mapping[str, Any] | None = None,
                in_block: str = "per-stage") -> nn.Module:
    """Return a freshly initialised model ``name`` fitted to ``shape``, all sites off.

    ``name`` is a built-in model or a user model spec (``FILE.py:Name``, ``package.module:Name``,
    ``torchvision:NAME``); a user model comes back with DropSites at its discovered sites.
    ``in_block`` says how sites inside repeated blocks are tied (config.IN_BLOCK).
    """
    if is_user_model(name):
        return _build_user_network(name, shape, model_args or {}, in_block)
    check_model(name, model_args)
    entry = get_builtin(name)
    if shape.image_size < entry.min_image_size:
        raise ModelError(
            f"model {name} needs --image-size of at least {entry.min_image_size}, but got {shape.image_size}."
        )
    return entry.build(shape, in_block=in_block, **entry.checked_arguments(name, model_args or {}))


def example_batch(shape: ModelShape) -> torch.Tensor:
    """Return two fixed random images of ``shape``, drawn without touching the global RNG."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, shape.channels, shape.image_size, shape.image_size, generator=generator)


def inspect_model(name: str, shape: ModelShape, model_args: Mapping[str, Any] | None = None, *,
                  member_inputs: bool = False, in_block: str = "per-stage") -> ModelSites:
    """Build the model once to list its sites and slots, check that it fits the data, and say
    whether its trials can be packed (``member_inputs``: each member with its own augmented images)."""
    model = build_model(name, shape, model_args=model_args, in_block=in_block)
    kinds = site_kinds(model)
    if not kinds:
        raise ModelError(f"model {name!r} has no drop sites to search.")
    with torch.inference_mode():
        model.eval()
        try:
            out = model(torch.zeros(2, shape.channels, shape.image_size, shape.image_size))
        except RuntimeError as e:
            raise ModelError(
                f"model {name!r} cannot take {shape.channels}x{shape.image_size}x{shape.image_size} images: {e}"
            ) from e
    if tuple(out.shape) != (2, shape.n_classes):
        raise ModelError(
            f"model {name!r} gives outputs of shape {tuple(out.shape[1:])} per image, but the data has "
            f"{shape.n_classes} classes."
        )
    return ModelSites(kinds, site_slots(model), packing_problem(model, member_inputs=member_inputs),
                      frozenset(branch_sites(model)), any(name.startswith(IN_BLOCK_PREFIX) for name in kinds))


def _build_user_network(name: str, shape: ModelShape, model_args: Mapping[str, Any], in_block: str) -> nn.Module:
    spec = parse_model_spec(name)
    built = build_user_model(
        spec, model_args, channels=shape.channels, n_classes=shape.n_classes, image_size=shape.image_size
    )
    example = example_batch(shape)
    # The plan found for the first trial's network serves every later one (same code, same call).
    version = Path(spec.source).stat().st_mtime_ns if spec.form == "file" else None
    cache_key = (spec.text, version, built.call, type(built.module), shape, in_block)
    model = insert_sites(built.module, example, label=spec.label, cache_key=cache_key, in_block=in_block)
    if cache_key in _CHECKED_OUTPUTS:
        return model
    model.eval()
    with torch.no_grad():
        out = model(example)
    model.train()
    if not isinstance(out, torch.Tensor):
        raise ModelError(
            f"model {spec.label} returns a {type(out).__name__}, but autodrop needs one tensor of class scores "
            f"per image (shape batch x {shape.n_classes})."
        )
    if tuple(out.shape) != (2, shape.n_classes):
        raise ModelError(
            f"model {spec.label} gives outputs of shape {tuple(out.shape[1:])} per image, but the data has "
            f"{shape.n_classes} classes; build it with {shape.n_classes} outputs (autodrop passes num_classes "
            "or n_classes when the constructor takes one)."
        )
    _CHECKED_OUTPUTS.add(cache_key)
    return model


_CHECKED_OUTPUTS: set = set()  # cache keys of user networks whose output was already checked


def list_sites(config: SearchConfig, *, n_classes: int) -> tuple[Discovery, ModelShape]:
    """Return the candidate sites of ``config``'s model, built for its image size and channels (3
    when the settings leave them to the data) and ``n_classes``, and the shape it was built for."""
    shape = ModelShape(config.data.channels or 3, n_classes, config.data.image_size)
    return describe_model_sites(config.model, shape, model_args=config.model_args, in_block=config.in_block), shape


def describe_model_sites(
    name: str, shape: ModelShape, *, model_args: Mapping[str, Any] | None = None, in_block: str = "per-stage"
) -> Discovery:
    """Return the candidate sites of model ``name`` built for ``shape``, with what each follows."""
    model = build_model(name, shape, model_args=model_args, in_block=in_block)
    found = discovery_of(model)
    if found is not None:
        return found
    # A built-in model: each site follows the layer registered before it; a site declared in two
    # slots is listed once, at its default slot, and a site tied across blocks once, at its first.
    shapes: dict[str, tuple[int, ...]] = {}

    def record_shape(module: DropSite, args: tuple) -> None:
        shapes.setdefault(module.site_name + module.slot, tuple(args[0].shape[1:]))

    handles = [site.register_forward_pre_hook(record_shape) for site in iter_sites(model)]
    model.eval()
    with torch.no_grad():
        model(example_batch(shape))
    for handle in handles:
        handle.remove()
    infos: list[SiteInfo] = []
    listed: set[tuple[str, str]] = set()
    for path, module in model.named_modules():
        if not isinstance(module, DropSite) or (module.site_name, module.slot) in listed:
            continue
        listed.add((module.site_name, module.slot))
        shown = shapes.get(module.site_name + module.slot, ())
        parent_path, _, attr = path.rpartition(".")
        if isinstance(module, BranchDrop):
            infos.append(SiteInfo(module.site_name, BRANCH, f"the residual branch of {parent_path}, before the sum",
                                  shown))
        elif module.slot == DropSite.DEFAULT_SLOT:
            follows = _previous_layer(model, parent_path, attr)
            if module.tied:
                follows += " (one decision for every block of the stage)"
            infos.append(SiteInfo(module.site_name, module.kind, follows, shown))
    return Discovery("built-in", tuple(infos))


def _previous_layer(model: nn.Module, parent_path: str, attr: str) -> str:
    """Return the path of the layer registered before ``attr`` in its parent, drop sites skipped."""
    parent = model.get_submodule(parent_path)
    previous = parent_path or "input"
    for name, child in parent.named_children():
        if name == attr:
            break
        if not isinstance(child, DropSite):
            previous = f"{parent_path}.{name}" if parent_path else name
    return previous

"""A user model with its chosen dropout, written out as PyTorch source that runs without autodrop.

The file imports the user's class (or factory, or torchvision) to build the layers, so the trained
weights load into it under the names they had in the search. Where autodrop traced the network,
the forward pass is the traced graph's code with ``nn.Dropout`` layers at the chosen sites; where it
used module hooks, the same hooks are written out with the file.

Everything pasted into the source is either validated here (identifiers, finite numbers, site names
the rebuilt network really has) or written with ``repr`` as a literal, so a study whose stored
values were edited cannot inject code.
"""

from __future__ import annotations

import inspect
import keyword
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from autodrop.config import ModelSpec, is_user_model, parse_model_args, parse_model_spec
from autodrop.errors import ModelError
from autodrop.nets import hooks
from autodrop.nets.discovery import DISCOVERY_ATTR, SITE_HOLDER, Discovery, insert_sites
from autodrop.nets.sites import BranchDrop, DropSite, apply_placement
from autodrop.nets.user import BuiltModel, build_user_model
from autodrop.outputs import written_layers

# The nn module that applies each dropout function, for the layers the exported class declares.
_DROPOUT_MODULES = {
    "dropout": "Dropout", "dropout1d": "Dropout1d", "dropout2d": "Dropout2d", "dropout3d": "Dropout3d",
    "alpha_dropout": "AlphaDropout", "feature_alpha_dropout": "FeatureAlphaDropout",
}
_RUNTIME_MARKER = "# --- exported runtime: everything below is copied into exported models ---\n"


def export_custom_source(
    spec: str,
    model_args: Mapping[str, Any],
    placement: Mapping[str, float | None],
    *,
    channels: int,
    n_classes: int,
    image_size: int,
    class_name: str = "ExportedModel",
    header: Sequence[str] = (),
    variants: Mapping[str, Mapping[str, str]] | None = None,
    in_block: str = "per-stage",
) -> str:
    """Return the source of a module that builds user model ``spec`` with dropout at ``placement``.

    ``spec`` and ``model_args`` are as the study stored them, ``placement`` maps site names to a
    rate or None (off); sites it leaves out are off; ``variants`` gives a site's dropout kind
    ("branch": the residual branch is dropped, by a DropPath the file defines); ``in_block`` is the
    study's way of tying in-block sites. ``channels``, ``n_classes`` and ``image_size``
    are the data's. ``header`` lines become comments at the top (study, trial, accuracy...).

    The module defines ``build_model()``, which returns the network; where the network was traced,
    also the class ``class_name``. Trained weights of the search's network load into it with
    ``load_state_dict`` as they are. Raises ModelError for a placement the rebuilt network does not
    have, or a rate outside [0, 1).
    """
    if not is_user_model(spec):
        raise ModelError(f"export_custom_source is for user models; {spec!r} is a built-in model.")
    if not class_name.isidentifier() or keyword.iskeyword(class_name):
        raise ModelError(f"class_name must be a Python identifier, but got {class_name!r}.")
    parsed = parse_model_spec(spec)
    args = parse_model_args(dict(model_args))  # keys identifiers, values plain literals
    for key, value in args.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ModelError(f"model argument {key}={value!r} cannot be written as source.")
    built = build_user_model(parsed, args, channels=channels, n_classes=n_classes, image_size=image_size)
    built_kwargs = dict(built.kwargs)
    example = torch.randn(2, channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    model = insert_sites(built.module, example, label=parsed.label, in_block=in_block)
    discovery: Discovery = getattr(model, DISCOVERY_ATTR)
    rates = _checked_placement(placement, discovery)
    try:
        apply_placement(model, rates, variants)
    except ModelError as e:
        raise ModelError(f"cannot export this placement: {e}") from e

    lines = _file_header(parsed, rates, header)
    lines += _imports(parsed, discovery)
    if discovery.method == "fx":
        lines += _traced_class(model, parsed, built, built_kwargs, class_name)
    else:
        lines += _hooked_factory(parsed, built, built_kwargs, model)
    return "\n".join(lines).rstrip() + "\n"


def _checked_placement(placement: Mapping[str, float | None], discovery: Discovery) -> dict[str, float | None]:
    names = [site.name for site in discovery.sites]
    unknown = sorted(set(placement) - set(names))
    if unknown:
        raise ModelError(f"placement names sites {unknown} that the model does not have; its sites are {names}.")
    rates: dict[str, float | None] = {}
    for name in names:
        rate = placement.get(name)
        if rate is not None:
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) < 1.0:
                raise ModelError(f"site {name!r} needs a rate in [0, 1) or None, but got {rate!r}.")
            rate = float(rate) if rate > 0 else None
        rates[name] = rate
    return rates


def _file_header(spec: ModelSpec, rates: Mapping[str, float | None], header: Sequence[str]) -> list[str]:
    chosen = ", ".join(f"{name} p={rate:.4g}" for name, rate in rates.items() if rate is not None) or "no dropout"
    lines = [
        f'"""{_plain(spec.label)} with the dropout autodrop chose: {_plain(chosen)}.',
        "",
        "Written by autodrop; runs with PyTorch alone (and the file or package that defines the model).",
        "Build it with build_model() and load the trained weights with",
        "model.load_state_dict(torch.load(path, weights_only=True)).",
        '"""',
    ]
    for line in header:
        lines.append(f"# {_plain(str(line))}")
    lines.append("")
    lines.append("from __future__ import annotations")
    lines.append("")
    return lines


def _imports(spec: ModelSpec, discovery: Discovery) -> list[str]:
    lines = ["import sys"]
    if discovery.method == "hooks":
        lines.append("from typing import Sequence")
    lines += ["", "import torch", "from torch import nn"]
    if spec.form == "torchvision":
        lines += ["import torchvision", ""]
        return lines
    owner, _, rest = spec.attr.partition(".")
    if spec.form == "file":
        path = Path(spec.source)
        if path.stem.isidentifier() and not keyword.iskeyword(path.stem):
            lines += [
                "",
                f"sys.path.insert(0, {str(path.parent)!r})  # the folder of {path.name}: change it if the file moves",
                f"from {path.stem} import {owner}  # noqa: E402",
                "",
            ]
        else:
            lines += [
                "import importlib.util",
                "",
                f"_MODEL_FILE = {str(path)!r}  # change it if the file moves",
                f"_spec = importlib.util.spec_from_file_location({_identifier(path.stem)!r}, _MODEL_FILE)",
                "_module = importlib.util.module_from_spec(_spec)",
                "sys.modules[_spec.name] = _module",
                "_spec.loader.exec_module(_module)",
                f"{owner} = _module.{owner}",
                "",
            ]
    else:
        lines += [f"from {spec.source} import {owner}", ""]
    return lines


def _construction(spec: ModelSpec, built: BuiltModel, kwargs: Mapping[str, Any], indent: str) -> list[str]:
    """The lines that build the user's network as ``net``, as autodrop built it."""
    arguments = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
    if spec.form == "torchvision":
        lines = [f"{indent}net = torchvision.models.get_model({spec.source!r}, {arguments})"]
        if built.first_conv is not None:
            conv_args = ", ".join(f"{key}={value!r}" for key, value in built.first_conv.kwargs.items())
            lines.append(f"{indent}# The first convolution takes the data's {built.first_conv.kwargs['in_channels']} channel(s).")
            lines.append(f"{indent}_set_submodule(net, {built.first_conv.path!r}, nn.Conv2d({conv_args}))")
        return lines
    return [f"{indent}net = {spec.attr}({arguments})"]


_SET_SUBMODULE = '''
def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
'''

_ADOPT = '''
def _adopt(source: nn.Module, target: nn.Module, path: str) -> None:
    """Give ``target`` the layer (or tensor) ``source`` holds at dotted ``path``, under the same name."""
    *parents, name = path.split(".")
    for part in parents:
        source_part = getattr(source, part)
        target_part = getattr(target, part, None)
        if source_part is target_part:
            return  # a whole parent was adopted already
        if target_part is None:
            target_part = nn.Module()
            setattr(target, part, target_part)
        source, target = source_part, target_part
    value = getattr(source, name)
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        target.register_buffer(name, value)
    else:
        setattr(target, name, value)
'''


def _traced_class(
    model: nn.Module, spec: ModelSpec, built: BuiltModel, kwargs: Mapping[str, Any], class_name: str,
) -> list[str]:
    """The traced graph as a class: the user's layers adopted by name, dropout at the chosen sites
    (each site module as the placement left it: on at its rate, or off)."""
    gm: Any = model
    graph = gm.graph
    dropout_layers: list[tuple[str, str, float, str]] = []  # attribute, class source, rate, site
    taken = {name for name, _ in gm.named_children()}
    for node in list(graph.nodes):
        if node.op != "call_module" or not str(node.target).startswith(f"{SITE_HOLDER}."):
            continue
        site = gm.get_submodule(node.target)
        assert isinstance(site, DropSite)
        rate = site.p
        if rate is None:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        attr = _unique(f"{'drop_path' if isinstance(site, BranchDrop) else 'drop'}_{_identifier(site.site_name)}",
                       taken)
        taken.add(attr)
        if isinstance(site, BranchDrop):
            module_class, layer = "DropPath", _DropPathStandIn(rate)
        else:
            module_class = "nn." + _DROPOUT_MODULES[getattr(site, "function", "dropout")]
            layer = getattr(nn, module_class[3:])(p=rate)
        dropout_layers.append((attr, module_class, rate, site.site_name))
        gm.add_module(attr, layer)
        node.target = attr
        if hasattr(node, "_rename"):  # the variable reads as the layer: drop_after_conv1 = ...
            node._rename(attr)
    graph.lint()
    layers: list[str] = []
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and not any(node.target == a for a, _, _, _ in dropout_layers):
            if node.target not in layers:
                layers.append(str(node.target))
    original = built.module
    for path in layers:
        if not _has_path(original, path):
            raise ModelError(
                f"cannot export {spec.label}: its traced graph uses {path!r}, which the model itself does not have "
                "(a tensor made inside forward?)."
            )
    code = graph.python_code(root_module="self")
    forward = _tidy(code.src)
    extra_imports = _check_globals(forward, code.globals, spec)

    lines = ["", *extra_imports, _SET_SUBMODULE.strip("\n"), "", "", _ADOPT.strip("\n"), "", ""]
    if any(module_class == "DropPath" for _, module_class, _, _ in dropout_layers):
        lines += [written_layers.DROP_PATH.strip("\n"), "", ""]
    lines.append(f"# The layers the forward pass uses, by the names they have in {spec.attr or spec.source}.")
    lines.append(f"LAYERS = {layers!r}")
    lines += ["", ""]
    lines.append(f"class {class_name}(nn.Module):")
    lines.append(f'    """{_plain(spec.label)} as autodrop traced it, with dropout at the chosen sites."""')
    lines.append("")
    lines.append("    def __init__(self) -> None:")
    lines.append("        super().__init__()")
    lines += _construction(spec, built, kwargs, "        ")
    lines.append("        for path in LAYERS:")
    lines.append("            _adopt(net, self, path)")
    for attr, module_class, rate, site_name in dropout_layers:
        lines.append(f"        self.{attr} = {module_class}(p={rate!r})  # site {_plain(site_name)}")
    lines.append("")
    for line in forward.splitlines():
        lines.append(f"    {line}" if line.strip() else "")
    lines += ["", ""]
    lines.append(f"def build_model() -> {class_name}:")
    lines.append(f'    """Return a fresh {class_name}."""')
    lines.append(f"    return {class_name}()")
    return lines


def _hooked_factory(spec: ModelSpec, built: BuiltModel, kwargs: Mapping[str, Any], model: Any) -> list[str]:
    """The user's network with the chosen dropout attached by forward hooks, as autodrop ran it."""
    entries = []
    for where, path, call, site in model.autodrop_hooks.entries:
        rate = site.p
        if rate is None and where != "replace":
            continue
        if rate is None:
            layer = "nn.Identity()"  # off: the model's own dropout goes, as in the search
        else:
            layer = f"nn.{_DROPOUT_MODULES[getattr(site, 'function', 'dropout')]}(p={rate!r})"
        entries.append(f"        ({where!r}, {path!r}, {call!r}, {layer}),  # site {_plain(site.site_name)}")
    runtime = inspect.getsource(hooks).split(_RUNTIME_MARKER, 1)[1]
    lines = ["", runtime.strip("\n"), "", "", _SET_SUBMODULE.strip("\n"), "", ""]
    lines.append("def build_model() -> nn.Module:")
    lines.append(f'    """Return {_plain(spec.label)} with dropout at the chosen sites, attached by forward hooks."""')
    lines += _construction(spec, built, kwargs, "    ")
    lines.append("    sites = [")
    lines += entries
    lines.append("    ]")
    lines.append("    net.dropout_sites = nn.ModuleList(site for *_, site in sites)")
    lines.append("    SiteCallHooks(net, sites)")
    lines.append("    return net")
    return lines


class _DropPathStandIn(nn.Module):
    """Holds a DropPath's place in the graph while its code is written (the file defines DropPath)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never run
        return x


def _tidy(source: str) -> str:
    """Drop the ``x = None`` clean-up statements fx appends: the code reads better without them."""
    out = []
    for line in source.strip("\n").splitlines():
        head, sep, tail = line.partition(";  ")
        if sep and re.fullmatch(r"(\w+ = )+None", tail.strip()):
            line = head
        out.append(line.rstrip())
    return "\n".join(out)


def _check_globals(source: str, globals_: Mapping[str, Any], spec: ModelSpec) -> list[str]:
    """Return import lines for the names the traced code uses beyond torch; refuse unknown ones."""
    import builtins

    lines: list[str] = []
    for name, value in globals_.items():
        if not re.search(rf"\b{re.escape(name)}\b", source):
            continue
        if value is torch or name == "torch" or getattr(builtins, name, None) is value:
            continue
        if name in ("inf", "nan"):
            lines.append(f"from math import {name}")
        elif name == "device":
            lines.append("from torch import device")
        elif name == "NoneType":
            lines.append("NoneType = type(None)")
        elif name == "operator":
            lines.append("import operator")
        else:
            raise ModelError(f"cannot export {spec.label}: its traced code calls {name!r}, which autodrop cannot import.")
    return lines + [""] if lines else []


def _has_path(root: nn.Module, path: str) -> bool:
    value: Any = root
    for part in path.split("."):
        if not hasattr(value, part):
            return False
        value = getattr(value, part)
    return True


def _identifier(text: str) -> str:
    name = re.sub(r"\W+", "_", text).strip("_") or "site"
    return f"s_{name}" if name[0].isdigit() else name


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def _plain(text: str) -> str:
    """Text safe inside a comment or docstring: printable, one line, no quotes that end a string."""
    return "".join(c if c.isprintable() else " " for c in text).replace('"""', "'''").replace("\\", "/")

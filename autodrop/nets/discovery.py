"""Find the candidate drop sites in any network, and put a DropSite at each.

The network is traced with ``torch.fx``; where tracing fails (data-dependent control flow, say), or
the traced graph does not reproduce the network's output, module hooks are used instead and the
result says so. Either way the network that comes back contains ``DropSite`` modules, so
``site_kinds`` and ``apply_placement`` work on it as on the built-in models.

Candidates (a site is off until a placement switches it on):

- after each conv block: an activation or pooling on a 4-D feature map, extended over the
  activation, pooling and normalisation that directly follow it;
- before each fully connected layer (``nn.Linear`` or ``F.linear`` on 2-D input);
- every dropout already there (``nn.Dropout*`` modules and ``F.dropout*`` calls), which becomes a
  searchable site in place of its fixed rate;
- a class the network uses two or more times (ResNet's ``BasicBlock``) counts as one layer: a site
  after each of its calls; inside it (fx only), a site after the activation that follows each of
  its convolutions but the last, i.e. before its next convolution, where wide ResNets put dropout.
  One decision serves every block of a stage (``in:layer2:conv1``; with ``in_block="per-call"``
  one per block, ``in:layer2.0:conv1``; ``"off"``: none). Deciding each of a ResNet-50's 16 blocks
  on its own would add 32 rates to a space a few dozen trials must search; the blocks of a stage
  see maps of one size and are meant to be alike, so they share one;
- after a residual sum (``x + shortcut``, found in the traced code: an add whose operands are feature
  maps of one shape, one of them through more convolutions than the other), the site gets a
  :class:`~autodrop.nets.sites.BranchDrop` on that branch, before the sum: its "branch" kind drops
  the whole branch per image (stochastic depth) instead of dropping after the sum.

A module called several times gives a site per call, named ``NAME#k`` (k counts its calls from 1).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from autodrop.errors import AutodropWarning, ModelError
from autodrop.nets.hooks import SiteCallHooks
from autodrop.nets.layers import CONTAINERS, DROPOUTS, module_kind
from autodrop.nets.sites import IN_BLOCK_PREFIX, BranchDrop, DropSite

SITE_HOLDER = "autodrop_sites"  # the submodule holding the inserted DropSites (they have no weights)
DISCOVERY_ATTR = "autodrop_discovery"  # the Discovery found for a network, kept on it for tables

_ACTIVATION_FNS = {"relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "selu_", "celu",
                   "celu_", "gelu", "silu", "mish", "hardswish", "prelu", "rrelu", "rrelu_"}
_POOL_FNS = {f"{kind}_pool{d}d" for kind in ("max", "avg", "adaptive_avg", "adaptive_max", "lp") for d in (1, 2, 3)}
_POOL_FNS |= {"fractional_max_pool2d", "fractional_max_pool3d"}
_NORM_FNS = {"batch_norm", "group_norm", "layer_norm", "instance_norm", "local_response_norm"}
# Functional dropouts and the dropout each becomes (torch.dropout and friends take (input, p, train)).
_DROPOUT_FNS = {"dropout": "dropout", "dropout1d": "dropout1d", "dropout2d": "dropout2d",
                "dropout3d": "dropout3d", "alpha_dropout": "alpha_dropout",
                "feature_alpha_dropout": "feature_alpha_dropout", "feature_dropout": "dropout2d"}
_RESHAPE_FNS = {"flatten", "reshape", "squeeze"}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "contiguous"}


@dataclass(frozen=True)
class SiteInfo:
    """One candidate site, as ``autodrop sites`` shows it."""

    name: str  # the site's name in the search, e.g. "after:conv21#2"
    kind: str  # "conv" for a 4-D feature map, "fc" for the input of a fully connected layer
    follows: str  # the layers it comes after, e.g. "conv1 > pool#1 > F.relu > bn1"
    shape: tuple[int, ...]  # the tensor there, per image, e.g. (16, 32, 32)
    existing: str | None = None  # the dropout the model had here, e.g. "Dropout(p=0.25)"


@dataclass(frozen=True)
class Discovery:
    """The sites found in a network and how they were found."""

    method: str  # "fx" (traced), "hooks" (module hooks, tracing failed) or "built-in"
    sites: tuple[SiteInfo, ...]
    note: str | None = None  # why hooks were used, when they were


class ReplacedDropout(DropSite):
    """A site where the network had a dropout of its own; it keeps that dropout's flavour.

    ``function`` names the torch.nn.functional dropout it applies (``dropout2d`` drops whole
    channels), at the rate the placement gives rather than the one the network was written with.
    """

    def __init__(self, name: str, kind: str, function: str) -> None:
        super().__init__(name, kind)
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p is None or not self.training:
            return x
        return getattr(nn.functional, self.function)(x, self.p, training=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, replaces {self.function}"


def insert_sites(model: nn.Module, example: torch.Tensor, *, label: str, cache_key: Any = None,
                 in_block: str = "per-stage") -> nn.Module:
    """Return ``model`` with a DropSite at each candidate site, all off; it runs as before.

    ``example`` is one batch of the input the network takes; ``label`` names the network in
    messages; ``in_block`` ties the sites inside repeated blocks per stage, per call, or leaves
    them out. The result carries its :class:`Discovery` as ``DISCOVERY_ATTR``. Raises ModelError
    where the network fails on the example or has no candidate site.

    With ``cache_key`` (hashable, and different whenever the network's code or arguments are),
    the sites found in the first network are put into later ones without probing them again: a
    search builds a fresh network for every trial.
    """
    if hasattr(model, SITE_HOLDER):
        raise ModelError(f"model {label} already has an attribute {SITE_HOLDER!r}, which autodrop needs for its sites.")
    cached = _PLANS.get(cache_key) if cache_key is not None else None
    if cached is not None:
        result = _apply_plan(model, cached, traced=None)
        result.train()
        return result
    # Probing runs the network: keep the global RNG as it was, so seeded training is unaffected.
    with torch.random.fork_rng(devices=[]):
        plan, result = _discover(model, example, label, in_block)
    if plan.note:
        warnings.warn(plan.note + ".", AutodropWarning, stacklevel=2)
    _check_channels_last(result, example, label)
    if cache_key is not None:
        _PLANS[cache_key] = plan
    result.train()
    return result


def _discover(model: nn.Module, example: torch.Tensor, label: str, in_block: str) -> tuple[_Plan, nn.Module]:
    model.eval()
    with torch.no_grad():
        try:
            reference = model(example)
        except Exception as e:
            shape = "x".join(str(s) for s in example.shape[1:])
            raise ModelError(f"model {label} cannot take {shape} images: {type(e).__name__}: {e}") from e
    try:
        traced = _trace(model, example)
        plan = _Plan("fx", _plan_fx(traced, model, in_block))
        _require_sites(plan, label)
        result = _apply_plan(model, plan, traced=traced)
        # With every site off the traced network must compute what the network does (in eval mode,
        # where the dropout that tracing fixed as training=True is now an off site).
        result.eval()
        with torch.no_grad():
            if not _same_output(result(example), reference):
                raise _TraceFailed("the traced graph computes other outputs than the network")
        return plan, result
    except _TraceFailed as e:
        note = f"torch.fx could not trace {label} ({e}); sites were found with module hooks, which see modules only"
    plan = _Plan("hooks", _plan_hooks(_probe_calls(model, example)), note)
    _require_sites(plan, label)
    return plan, _apply_plan(model, plan, traced=None)


def _require_sites(plan: "_Plan", label: str) -> None:
    if not plan.sites:
        raise ModelError(
            f"model {label} has no candidate drop sites: no activation or pooling on 4-D feature maps, no linear "
            "layer on 2-D input and no dropout were found."
        )


class _TraceFailed(Exception):
    """torch.fx cannot stand in for this network; fall back to hooks."""


@dataclass
class _Planned:
    """A site to put into a network: where, and what it is."""

    where: str  # "after" the node or call, "before" the (linear) one, "replace" the (dropout) one, or
    # "branch": on the residual branch of the (add) node, before the sum
    at: str  # fx: the graph node's name; hooks: the submodule's path
    kind: str
    base: str  # the name, before any clash with another site's is resolved
    follows: str
    shape: tuple[int, ...]
    existing: str | None = None
    function: str | None = None  # for "replace": the dropout function it keeps
    order: float = 0.0  # position in the forward pass
    call: int = 0  # hooks: which call of the submodule (from 1)
    name: str = ""
    tied: bool = False  # one of several copies of one in-block site (the same place in every block of a stage)
    head: str = ""  # fx, "after": the node the site's chain starts from (a block's output, say)
    branch: str = ""  # fx, "branch": the operand of the sum that is the residual branch


@dataclass(frozen=True)
class _Plan:
    method: str  # "fx" or "hooks"
    sites: list[_Planned]
    note: str | None = None

    @property
    def discovery(self) -> Discovery:
        infos: list[SiteInfo] = []
        listed: set[tuple[str, str]] = set()
        for p in self.sites:
            kind = "branch" if p.where == "branch" else p.kind
            if (p.name, kind) not in listed:  # a tied site once, at its first block
                listed.add((p.name, kind))
                infos.append(SiteInfo(p.name, kind, p.follows, p.shape, p.existing))
        return Discovery(self.method, tuple(infos), self.note)


# Plans found per cache key, so that each trial's fresh network is not probed again.
_PLANS: dict[Any, _Plan] = {}


def _apply_plan(model: nn.Module, plan: _Plan, *, traced: nn.Module | None) -> nn.Module:
    if plan.method == "fx":
        result = _apply_fx(traced if traced is not None else _trace(model, None), plan.sites)
    else:
        result = _apply_hooks(model, plan.sites)
    setattr(result, DISCOVERY_ATTR, plan.discovery)
    return result


def _make_site(item: _Planned) -> DropSite:
    if item.where == "replace":
        return ReplacedDropout(item.name, item.kind, item.function or "dropout")
    if item.where == "branch":
        return BranchDrop(item.name)
    return DropSite(item.name, item.kind, tied=item.tied)


def _assign_names(planned: list[_Planned]) -> None:
    """Sort sites into forward order and name them; a clash (two sites after one layer) takes the
    position's own name."""
    planned.sort(key=lambda p: p.order)
    seen: set[str] = set()
    for item in planned:
        name = item.base
        if item.tied:  # copies of one site share its name
            item.name = name
            seen.add(name)
            continue
        if name in seen:
            name = f"{item.base}@{item.at}" if item.call == 0 else f"{item.base}@{item.call}"
        seen.add(name)
        item.name = name


# ----------------------------------------------------------------------------------------------
# torch.fx


def _trace(model: nn.Module, example: torch.Tensor | None) -> nn.Module:
    """Return the traced network; with ``example``, each node's output shape recorded."""
    import torch.fx
    from torch.fx.passes.shape_prop import ShapeProp

    was_training = model.training
    model.train()  # trace what training runs: code that reads self.training is fixed at trace time
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:
        raise _TraceFailed(_first_line(e)) from e
    finally:
        model.train(was_training)
    _views_to_reshapes(gm)
    if example is None:
        return gm
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as e:
        raise _TraceFailed(f"the traced graph fails to run: {_first_line(e)}") from e
    return gm


def _views_to_reshapes(gm: nn.Module) -> None:
    """Turn ``x.view(sizes)`` into ``x.reshape(sizes)``: the same values, in any memory layout.

    autodrop trains in channels-last layout, where ``.view`` on a feature map fails.
    """
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target == "view" and all(
            isinstance(a, (int, tuple, list)) or _is_node(a) for a in node.args[1:]
        ):
            node.target = "reshape"
            node.meta["autodrop_written_as"] = "view"  # the label shows what the user wrote
    gm.recompile()


def _apply_fx(gm: nn.Module, planned: list[_Planned]) -> nn.Module:
    holder = nn.Module()
    gm.add_module(SITE_HOLDER, holder)
    graph = gm.graph
    nodes = {node.name: node for node in graph.nodes}
    for item in planned:
        node = nodes[item.at]
        attr = _attr_name(item.name, holder)
        holder.add_module(attr, _make_site(item))
        target = f"{SITE_HOLDER}.{attr}"
        if item.where == "after":
            with graph.inserting_after(node):
                new = graph.call_module(target, (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        elif item.where == "before":
            source = node.args[0]
            with graph.inserting_before(node):
                new = graph.call_module(target, (source,))
            node.replace_input_with(source, new)
        elif item.where == "branch":
            source = nodes[item.branch]
            with graph.inserting_before(node):
                new = graph.call_module(target, (source,))
            node.replace_input_with(source, new)
        else:
            source = _dropout_input(node)
            with graph.inserting_before(node):
                new = graph.call_module(target, (source,))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()  # the replaced nn.Dropout modules
    return gm


def _plan_fx(gm: nn.Module, model: nn.Module, in_block: str = "per-stage") -> list[_Planned]:
    graph = _FxGraph(gm, model)
    planned = graph.conv_sites() + graph.fc_sites() + graph.dropout_sites() + graph.in_block_sites(in_block)
    _assign_names(planned)
    # A site after a residual sum also gets the branch drop, under its name (known only now).
    planned += graph.branch_sites(planned)
    planned.sort(key=lambda p: p.order)
    return planned


class _FxGraph:
    """A traced network's nodes, with what each does and whether it runs inside a repeated block."""

    def __init__(self, gm: nn.Module, model: nn.Module) -> None:
        self.nodes = list(gm.graph.nodes)
        self.position = {node: i for i, node in enumerate(self.nodes)}
        self.modules = dict(gm.named_modules())
        self.labels = _Labels(self.nodes)
        repeated = _repeated_classes(model)
        self.block_of = {node: _block_key(node, repeated) for node in self.nodes}
        self.inner_block_of = {node: _block_key(node, repeated, innermost=True) for node in self.nodes}
        self.block_outputs = self._block_outputs()

    def kind_of(self, node: Any) -> str | None:
        return _fx_kind(node, self.modules)

    def outside(self, node: Any) -> bool:
        """Whether ``node`` runs outside every repeated block."""
        return self.block_of[node] is None

    def _block_outputs(self) -> dict[Any, str]:
        """Return each repeated block call's single output node, mapped to the call's label.

        A class used two or more times is one layer: its output is a start, its inside is not.
        """
        members: dict[str, list[Any]] = {}
        for node in self.nodes:
            if self.block_of[node] is not None:
                members.setdefault(self.block_of[node], []).append(node)
        block_calls = Counter(key.split("@")[0] for key in members)
        outputs_of: dict[Any, str] = {}
        for key, inside in members.items():
            inside_set = set(inside)
            outputs = [n for n in inside if any(u not in inside_set for u in n.users)]
            path, _, call = key.partition("@")
            label = path + (f"#{int(call or 0) + 1}" if block_calls[path] > 1 else "")
            if len(outputs) == 1 and _is_feature_map(outputs[0]):
                outputs_of[outputs[0]] = label
        return outputs_of

    def conv_sites(self) -> list[_Planned]:
        """Sites after conv blocks: activations and poolings on feature maps (and repeated blocks'
        outputs) start one, extended over the activation, pooling and norm that follow."""
        kind_of, outside, labels = self.kind_of, self.outside, self.labels
        starts = [n for n in self.nodes if n in self.block_outputs]
        for node in self.nodes:
            if outside(node) and kind_of(node) in ("act", "pool") and _is_feature_map(node):
                if kind_of(node) == "pool" and _is_global(node):
                    continue  # a site after global pooling would duplicate the one before the head
                starts.append(node)
        finals: dict[Any, None] = {}
        for start in sorted(starts, key=self.position.__getitem__):
            finals[_extend(start, kind_of, outside)] = None
        planned = []
        for final in finals:
            users = list(final.users)
            if len(users) == 1 and kind_of(users[0]) == "dropout":
                continue  # the dropout already there is the site
            chain = _chain_back(final, kind_of, outside, self.block_outputs)
            head = chain[0]
            if head in self.block_outputs:
                base = f"after:{self.block_outputs[head]}"
                shown = [self.block_outputs[head]] + [labels.of(n) for n in chain[1:]]
            else:
                # Named for the layer the block starts from: conv1 in conv1 > pool > F.relu > bn1.
                base = f"after:{labels.of(head)}" if head.op == "call_module" else f"after:{head.name}"
                shown = [labels.of(n) for n in chain]
            planned.append(_Planned("after", final.name, "conv", base, " > ".join(shown), _per_image(final),
                                    order=self.position[final] + 0.5, head=head.name))
        return planned

    def in_block_sites(self, mode: str) -> list[_Planned]:
        """Sites inside repeated blocks, after the activation that follows each convolution that
        feeds the block's next convolution; one name per stage (tied) or per block call."""
        if mode == "off":
            return []
        members: dict[str, list[Any]] = {}
        for node in self.nodes:
            if self.inner_block_of[node] is not None:
                members.setdefault(self.inner_block_of[node], []).append(node)
        block_calls = Counter(key.split("@")[0] for key in members)
        planned = []
        for key, inside in members.items():
            inside_set = set(inside)
            path, _, call = key.partition("@")
            for conv in inside:
                if self.kind_of(conv) != "conv" or conv.op != "call_module":
                    continue
                chain = self._activated_chain(conv, inside_set)
                if chain is None:
                    continue
                final = chain[-1]
                relative = str(conv.target)[len(path) + 1 :] if str(conv.target).startswith(path + ".") else conv.name
                if mode == "per-stage":
                    stage = path.rpartition(".")[0] or path
                    base = f"{IN_BLOCK_PREFIX}{stage}:{relative}"
                else:
                    label = path + (f"#{int(call or 0) + 1}" if block_calls[path] > 1 else "")
                    base = f"{IN_BLOCK_PREFIX}{label}:{relative}"
                follows = " > ".join(self.labels.of(n) for n in chain)
                if mode == "per-stage":
                    follows += " (one decision for every block of the stage)"
                planned.append(_Planned("after", final.name, "conv", base, follows, _per_image(final),
                                        order=self.position[final] + 0.5, tied=mode == "per-stage"))
        return planned

    def _activated_chain(self, conv: Any, inside: set[Any]) -> list[Any] | None:
        """Return conv > norm/act ... when an activation follows ``conv`` and the chain's only user
        is another convolution of the same block; None otherwise (the block's last convolution)."""
        chain, activated = [conv], False
        while True:
            users = list(chain[-1].users)
            if len(users) != 1 or users[0] not in inside:
                return None
            user = users[0]
            kind = self.kind_of(user)
            if kind == "conv":
                return chain if activated and _is_feature_map(chain[-1]) else None
            if kind not in ("norm", "act") or not user.args or user.args[0] is not chain[-1]:
                return None
            activated = activated or kind == "act"
            chain.append(user)

    def branch_sites(self, planned: list[_Planned]) -> list[_Planned]:
        """A branch drop for each site that follows a residual sum: on the sum's branch operand."""
        by_head = {item.head: item for item in planned if item.where == "after" and item.head}
        last_sum: dict[str, Any] = {}  # a repeated block's call -> its last residual sum
        found = []
        for node in self.nodes:
            branch = _residual_branch(node)
            if branch is None:
                continue
            key = self.block_of[node]
            if key is not None:
                last_sum[key] = (node, branch)
                continue
            # A sum outside blocks: the site must start right at its activation (relu(x + y)).
            owner = next((by_head[user.name] for user in node.users if user.name in by_head), None)
            if owner is not None:
                found.append((node, branch, owner))
        outputs = {self.block_of[node]: node for node in self.block_outputs}
        for key, (node, branch) in last_sum.items():
            output = outputs.get(key)
            owner = by_head.get(output.name) if output is not None else None
            if owner is not None:
                found.append((node, branch, owner))
        return [
            _Planned("branch", node.name, "conv", owner.name, f"the residual branch of {owner.name[len('after:'):]}",
                     _per_image(branch), order=self.position[node] - 0.5, name=owner.name, branch=branch.name)
            for node, branch, owner in found
        ]

    def fc_sites(self) -> list[_Planned]:
        """Sites on the input of each fully connected layer, unless a dropout already feeds it."""
        planned = []
        for node in self.nodes:
            if not self.outside(node) or self.kind_of(node) != "linear" or not node.args or not _is_node(node.args[0]):
                continue
            source = node.args[0]
            if len(_shape(source) or ()) != 2 or _fed_by_dropout(source, self.kind_of):
                continue
            planned.append(_Planned("before", node.name, "fc", f"before:{self.labels.of(node, numbered=True)}",
                                    self.labels.of(source), _per_image(source), order=self.position[node] - 0.5))
        return planned

    def dropout_sites(self) -> list[_Planned]:
        """Each dropout already there, inside blocks too, as a searchable site."""
        planned = []
        for node in self.nodes:
            if self.kind_of(node) != "dropout":
                continue
            source = _dropout_input(node)
            shape = _per_image(node)
            if node.op == "call_module":
                module = self.modules[node.target]
                function = DROPOUTS[type(module)]
                existing = f"{type(module).__name__}(p={module.p:g})"
            else:
                function = _DROPOUT_FNS[node.target.__name__]
                existing = f"{_Labels.function(node.target)}(p={_dropout_rate(node):g})"
            kind = "conv" if len(shape) >= 3 else "fc"
            follows = self.labels.of(source) if _is_node(source) else "input"
            planned.append(_Planned("replace", node.name, kind, self.labels.of(node, numbered=True), follows, shape,
                                    existing, function, order=float(self.position[node])))
        return planned


def _extend(node: Any, kind_of: Callable[[Any], str | None], outside: Callable[[Any], bool]) -> Any:
    """Follow the activation, pooling and normalisation that directly consume ``node``."""
    while True:
        users = list(node.users)
        if len(users) != 1:
            return node
        user = users[0]
        if not outside(user) or kind_of(user) not in ("act", "pool", "norm") or not user.args:
            return node
        if user.args[0] is not node or not _is_feature_map(user):
            return node
        if kind_of(user) == "pool" and _is_global(user):
            return node  # a site after global pooling would duplicate the one before the head
        node = user


def _chain_back(
    final: Any, kind_of: Callable[[Any], str | None], outside: Callable[[Any], bool], block_outputs: Mapping[Any, str]
) -> list[Any]:
    """Return the nodes from the layer a site follows (a conv, a block, an add) to ``final``."""
    chain = [final]
    node = final
    while node not in block_outputs and kind_of(node) in ("act", "pool", "norm") and node.args and _is_node(node.args[0]):
        previous = node.args[0]
        if not outside(previous) and previous not in block_outputs:
            break
        chain.insert(0, previous)
        node = previous
    return chain


_ADD_FUNCTIONS = {"add", "iadd"}


def _residual_branch(node: Any) -> Any | None:
    """Return the branch operand of a residual sum ``branch + shortcut``, or None if ``node`` is no
    such sum: two feature maps of one shape, one reached through more convolutions than the other
    since their paths parted (the shortcut: none, or a projection)."""
    if node.op == "call_function":
        if getattr(node.target, "__name__", "") not in _ADD_FUNCTIONS:
            return None
    elif not (node.op == "call_method" and node.target in ("add", "add_")):
        return None
    operands = [a for a in node.args if _is_node(a)]
    if len(operands) != 2 or len(node.args) != 2 or node.kwargs:
        return None
    a, b = operands
    if not (_is_feature_map(a) and _is_feature_map(b)) or _shape(a) != _shape(b) or a is b:
        return None
    above_a, above_b = _ancestors(a), _ancestors(b)
    convs_a = sum(1 for n in above_a - above_b if _is_conv_node(n))
    convs_b = sum(1 for n in above_b - above_a if _is_conv_node(n))
    if convs_a == convs_b:
        return None
    return a if convs_a > convs_b else b


def _ancestors(node: Any) -> set[Any]:
    """``node`` and every node it is computed from."""
    seen = {node}
    stack = [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _is_conv_node(node: Any) -> bool:
    if node.op == "call_module":
        owner = node.graph.owning_module
        return owner is not None and module_kind(owner.get_submodule(node.target)) == "conv"
    return node.op == "call_function" and getattr(node.target, "__name__", "") in ("conv1d", "conv2d", "conv3d")


def _fed_by_dropout(node: Any, kind_of: Callable[[Any], str | None]) -> bool:
    while True:
        kind = kind_of(node)
        if kind == "dropout":
            return True
        if kind != "reshape" or not node.args or not _is_node(node.args[0]):
            return False
        node = node.args[0]


def _fx_kind(node: Any, modules: Mapping[str, nn.Module]) -> str | None:
    """Return what a node does, in the terms site discovery needs, or None."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if isinstance(module, nn.Flatten):
            return "reshape"
        return module_kind(module)
    if node.op == "call_function":
        if getattr(node.target, "__module__", None) == "_operator":
            return None
        name = getattr(node.target, "__name__", "")
        if name in _ACTIVATION_FNS:
            return "act"
        if name in _POOL_FNS:
            return "pool"
        if name in _NORM_FNS:
            return "norm"
        if name in _DROPOUT_FNS:
            return "dropout"
        if name == "linear":
            return "linear"
        if name in _RESHAPE_FNS:
            return "reshape"
        return None
    if node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return "act"
        if node.target in _RESHAPE_METHODS:
            return "reshape"
    return None


def _block_key(node: Any, repeated: set[type], *, innermost: bool = False) -> str | None:
    """Return the scope key (``path`` or ``path@k`` for its k+1-th call) of the outermost (or
    innermost) repeated class the node runs in, or None."""
    stack = node.meta.get("nn_module_stack") or {}
    entries = list(stack.items())
    if node.op == "call_module" and entries:
        entries = entries[:-1]  # the module itself is not a scope around its call
    for key, value in reversed(entries) if innermost else entries:
        module_type = value[1] if isinstance(value, tuple) and len(value) > 1 else None
        if module_type in repeated:
            return key
    return None


def _repeated_classes(model: nn.Module) -> set[type]:
    """Return the user classes (not torch.nn's own, not containers) the model holds two or more of."""
    counts: Counter[type] = Counter()
    for module in model.modules():
        kind = type(module)
        if module is model or isinstance(module, CONTAINERS) or kind.__module__.startswith("torch.nn."):
            continue
        counts[kind] += 1
    return {kind for kind, n in counts.items() if n >= 2}


class _Labels:
    """Readable labels for graph nodes: ``conv11#2`` for the second call of conv11, ``F.relu``.

    Modules are numbered by call where they are called more than once; functions only where asked
    (a site named for ``F.dropout`` needs its number, a ``follows`` column does not).
    """

    def __init__(self, nodes: list[Any]) -> None:
        self.call_number: dict[Any, int] = {}
        self.n_calls: Counter[Any] = Counter()
        for node in nodes:
            if node.op in ("call_module", "call_function"):
                key = (node.op, node.target)
                self.n_calls[key] += 1
                self.call_number[node] = self.n_calls[key]

    def of(self, node: Any, *, numbered: bool = False) -> str:
        if node.op == "call_module":
            base = str(node.target)
        elif node.op == "call_function":
            base = self.function(node.target)
            if not numbered:
                return base
        elif node.op == "call_method":
            return f".{node.meta.get('autodrop_written_as', node.target)}()"
        else:
            return node.name
        key = (node.op, node.target)
        return base + (f"#{self.call_number[node]}" if self.n_calls[key] > 1 else "")

    @staticmethod
    def function(target: Any) -> str:
        name = getattr(target, "__name__", str(target))
        module = getattr(target, "__module__", None) or ""
        if module == "_operator":
            return name
        if module.startswith("torch.nn.functional") or module == "torch._C._nn":
            return f"F.{name}"
        if module.startswith("torch"):
            return f"torch.{name}"
        return name


def _dropout_input(node: Any) -> Any:
    if node.args:
        return node.args[0]
    return node.kwargs.get("input")


def _dropout_rate(node: Any) -> float:
    if "p" in node.kwargs:
        return float(node.kwargs["p"])
    if len(node.args) > 1 and isinstance(node.args[1], (int, float)):
        return float(node.args[1])
    return 0.5


def _shape(node: Any) -> tuple[int, ...] | None:
    from torch.fx.passes.shape_prop import TensorMetadata

    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _per_image(node: Any) -> tuple[int, ...]:
    shape = _shape(node) or ()
    return tuple(int(s) for s in shape[1:])


def _is_feature_map(node: Any) -> bool:
    shape = _shape(node)
    return shape is not None and len(shape) == 4


def _is_global(node: Any) -> bool:
    """Whether a pooling leaves one pixel per channel (global pooling)."""
    shape = _shape(node)
    return shape is not None and len(shape) == 4 and shape[2] * shape[3] == 1


def _is_node(value: Any) -> bool:
    import torch.fx

    return isinstance(value, torch.fx.Node)


# ----------------------------------------------------------------------------------------------
# Module hooks (the fallback)


@dataclass
class _Call:
    """One call of a submodule seen while probing the network."""

    path: str
    module: nn.Module
    number: int  # 1 for its first call in the forward pass
    kind: str  # conv, act, pool, norm, dropout, linear or block
    input: Any
    output: Any
    label: str = ""


def _apply_hooks(model: nn.Module, planned: list[_Planned]) -> nn.Module:
    holder = nn.Module()
    entries = []
    for item in planned:
        site = _make_site(item)
        holder.add_module(_attr_name(item.name, holder), site)
        entries.append((item.where, item.at, item.call, site))
    model.add_module(SITE_HOLDER, holder)
    model.autodrop_hooks = SiteCallHooks(model, entries)
    return model


def _probe_calls(model: nn.Module, example: torch.Tensor) -> list[_Call]:
    """Run the network once and record the submodule calls that matter, a repeated block as one."""
    repeated = _repeated_classes(model)
    names: dict[int, str] = {}
    for path, module in model.named_modules():
        names.setdefault(id(module), path)
    counts: Counter[str] = Counter()
    calls: list[_Call] = []
    running_blocks: list[nn.Module] = []
    handles = []

    def before(module: nn.Module, args: tuple) -> None:
        if type(module) in repeated:
            running_blocks.append(module)

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        path = names[id(module)]
        counts[path] += 1
        if type(module) in repeated:
            running_blocks.pop()
            kind: str | None = "block"
        else:
            kind = module_kind(module)
        # Inside a repeated block only its dropouts count; the block's own call stands for the rest.
        if kind is None or (running_blocks and kind != "dropout"):
            return
        calls.append(_Call(path, module, counts[path], kind, args[0] if args else None, output))

    for module in model.modules():
        if module is model or isinstance(module, CONTAINERS):
            continue
        if type(module) not in repeated and any(True for _ in module.children()):
            continue  # a parent used once: its leaves say what happens
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    for call in calls:
        call.label = call.path + (f"#{call.number}" if counts[call.path] > 1 else "")
    return calls


def _plan_hooks(calls: list[_Call]) -> list[_Planned]:
    """Plan sites from the calls: hooks see modules only, so a chain links calls whose input is the
    previous call's output, and a conv followed by a functional activation ends its chain (dropout
    before a ReLU equals dropout after it)."""

    def linked(a: _Call, b: _Call) -> bool:
        return isinstance(a.output, torch.Tensor) and b.input is a.output

    def per_image(value: Any) -> tuple[int, ...]:
        return tuple(int(s) for s in value.shape[1:]) if isinstance(value, torch.Tensor) else ()

    def feature_map(value: Any, allow_global: bool = True) -> bool:
        if not isinstance(value, torch.Tensor) or value.dim() != 4:
            return False
        return allow_global or value.shape[2] * value.shape[3] > 1

    planned: list[_Planned] = []
    i = 0
    while i < len(calls):
        start = calls[i]
        if start.kind not in ("conv", "act", "pool", "block") or not feature_map(start.output, start.kind != "pool"):
            i += 1
            continue
        end = i
        while end + 1 < len(calls):
            following = calls[end + 1]
            if following.kind not in ("act", "pool", "norm") or not linked(calls[end], following):
                break
            if not feature_map(following.output, following.kind != "pool"):
                break
            end += 1
        final = calls[end]
        next_call = calls[end + 1] if end + 1 < len(calls) else None
        if not (next_call is not None and next_call.kind == "dropout" and linked(final, next_call)):
            planned.append(_Planned(
                "after", final.path, "conv", f"after:{start.label}", " > ".join(c.label for c in calls[i : end + 1]),
                per_image(final.output), order=end + 0.5, call=final.number,
            ))
        i = end + 1
    for index, call in enumerate(calls):
        previous = calls[index - 1] if index > 0 else None
        follows = previous.label if previous is not None else "input"
        if call.kind == "linear" and isinstance(call.input, torch.Tensor) and call.input.dim() == 2:
            if previous is not None and previous.kind == "dropout":
                continue  # (through a flatten hooks cannot see) the dropout already there is the site
            planned.append(_Planned("before", call.path, "fc", f"before:{call.label}", follows,
                                    per_image(call.input), order=index - 0.5, call=call.number))
        elif call.kind == "dropout":
            kind = "conv" if isinstance(call.output, torch.Tensor) and call.output.dim() >= 3 else "fc"
            existing = f"{type(call.module).__name__}(p={call.module.p:g})"
            planned.append(_Planned("replace", call.path, kind, call.label, follows, per_image(call.output), existing,
                                    DROPOUTS[type(call.module)], order=float(index), call=call.number))
    _assign_names(planned)
    return planned


def _check_channels_last(model: nn.Module, example: torch.Tensor, label: str) -> None:
    """autodrop trains in channels-last layout; say so plainly if the network cannot run in it."""
    probe = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()
    try:
        with torch.no_grad():
            probe(example.contiguous(memory_format=torch.channels_last))
    except RuntimeError as e:
        raise ModelError(
            f"model {label} fails in channels-last memory layout, which autodrop trains in: {_first_line(e)} "
            "(use torch.flatten(x, 1) or x.reshape(...) instead of x.view(...) on feature maps)."
        ) from e


# ----------------------------------------------------------------------------------------------
# Shared helpers


def _attr_name(name: str, holder: nn.Module) -> str:
    """Return a Python identifier for ``name`` that ``holder`` does not use yet."""
    attr = re.sub(r"\W+", "_", name).strip("_") or "site"
    if attr[0].isdigit():
        attr = f"s_{attr}"
    candidate, n = attr, 1
    while hasattr(holder, candidate):
        n += 1
        candidate = f"{attr}_{n}"
    return candidate


def _same_output(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_output(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_output(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def discovery_of(model: nn.Module) -> Discovery | None:
    """Return the Discovery kept on a network by insert_sites, or None (built-in models)."""
    return getattr(model, DISCOVERY_ATTR, None)



def format_sites(discovery: Discovery, *, title: str) -> str:
    """Return the sites as the terminal table ``autodrop sites`` prints."""
    rows = [("site", "kind", "follows", "shape", "dropout already")]
    for site in discovery.sites:
        shape = "x".join(str(s) for s in site.shape) or "-"
        rows.append((site.name, site.kind, site.follows, shape, site.existing or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [title, ""]
    for n, row in enumerate(rows):
        lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  " + "  ".join("-" * width for width in widths))
    found_by = {
        "fx": "found by tracing the network with torch.fx",
        "hooks": "found with module hooks",
        "built-in": "declared by the built-in model",
    }[discovery.method]
    lines.append("")
    n_sites = len({site.name for site in discovery.sites})
    branches = sum(site.kind == "branch" for site in discovery.sites)
    also = f" ({branches} of them after a residual sum, with the branch kind)" if branches else ""
    lines.append(f"{n_sites} sites{also}, {found_by}.")
    if discovery.note:
        lines.append(f"Note: {discovery.note}.")
    return "\n".join(lines)

"""Several trials trained as one network: K copies of a flat ``nn.Sequential``, packed side by side.

One small trial leaves a GPU mostly idle. Packing K trials of the same architecture into one
network makes each kernel K times larger while every member keeps its own weights:

- activations of conv layers are (N, K*C, H, W): member k owns channels [k*C, (k+1)*C);
- the first convolution sees the shared input, so its K weight sets are simply stacked along the
  output channels; later convolutions are grouped (``groups=K``), so no member sees another's maps;
- batch norm over K*C channels keeps per-member statistics, because its statistics are per channel;
- after ``Flatten`` activations are (K, N, F) and linear layers are batched matrix products;
- a drop site holds one rate per member (0 for "off"), applied as a per-channel mask;
- the loss is the sum of the members' mean losses, so each member's gradient is its own.

Every packed tensor is member-major (``tensor.view(K, -1)[k]`` is member k's), which is what lets
the packed optimiser keep a step count per member (autodrop/training/optim.py): a pruned member's
slot can be handed to a fresh trial at an epoch boundary, and the fresh trial trains exactly as it
would alone (autodrop/training/packed.py trains the pack). In eval mode a packed model gives each
member the outputs of the separate model with the same weights.

Only layers whose packed form is known are accepted (:func:`packing_problem` says which is not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from autodrop.nets import masks
from autodrop.nets.layers import ELEMENTWISE, SPATIAL_2D
from autodrop.nets.residual import Residual
from autodrop.nets.sites import BRANCH, BranchDrop, DropSite, iter_sites

# Layouts of the activations as they flow through the packed network.
_IMAGE, _FLAT, _CONV, _FC = "shared image", "shared flat", "packed maps", "packed features"


def packing_problem(model: nn.Module, *, member_inputs: bool = False) -> str | None:
    """Return why ``model`` cannot be packed, or None if it can; ``member_inputs``: each member gets
    an input of its own (augmented its own way), which only a first convolution can take."""
    if not isinstance(model, nn.Sequential):
        return f"only flat nn.Sequential models can be packed, not {type(model).__name__}"
    if member_inputs and isinstance(next(iter(model), None), (nn.Linear, nn.Flatten)):
        return "each member's own (augmented) images need a convolution as the first layer with weights"
    layout, problem = _sequence_layout(model, _IMAGE)
    if problem:
        return problem
    if layout not in (_FC,):
        return "the model must end in a linear layer's outputs"
    return None


def _sequence_layout(sequence: nn.Sequential, layout: str) -> tuple[str, str | None]:
    """Return the layout after the layers of ``sequence`` and the first problem packing them meets."""
    for name, module in sequence.named_children():
        layout, problem = _next_layout(layout, module)
        if problem:
            return layout, f"layer {name!r} ({type(module).__name__}): {problem}"
    return layout, None


def _next_layout(layout: str, module: nn.Module) -> tuple[str, str | None]:
    """Return the layout after ``module`` and a problem if it cannot be packed in ``layout``."""
    if isinstance(module, nn.Conv2d):
        if layout not in (_IMAGE, _CONV):
            return layout, "a convolution after flattening"
        if module.groups != 1:
            return layout, "grouped convolutions are not packed"
        if module.padding_mode != "zeros":
            return layout, f"padding_mode {module.padding_mode!r} is not packed"
        return _CONV, None
    if isinstance(module, nn.BatchNorm2d):
        if layout != _CONV:
            return layout, "batch norm before the first convolution"
        if module.momentum is None or not module.track_running_stats:
            return layout, "batch norm with a cumulative average or without running statistics"
        return layout, None
    if isinstance(module, nn.Linear):
        if layout in (_IMAGE, _CONV):
            return layout, "a linear layer on unflattened maps"
        return _FC, None
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            return layout, "only Flatten(start_dim=1) is packed"
        return {_IMAGE: _FLAT, _CONV: _FC}.get(layout, layout), None
    if isinstance(module, Residual):
        if layout != _CONV:
            return layout, "a residual block before the first convolution or after flattening"
        for part in (module.pre, module.branch, module.shortcut):
            if part is None:
                continue
            after, problem = _sequence_layout(part, _CONV)
            if problem or after != _CONV:
                return layout, problem or "a residual block whose parts leave the feature maps"
        return layout, None
    if isinstance(module, DropSite):
        if layout in (_IMAGE, _FLAT):
            return layout, "a drop site before the first layer with weights"
        return layout, None
    if isinstance(module, (nn.LogSoftmax, nn.Softmax)):
        if layout != _FC or module.dim not in (1, -1):
            return layout, "softmax over other than the class dimension"
        return layout, None
    if isinstance(module, SPATIAL_2D):
        if layout in (_FLAT, _FC):
            return layout, "pooling after flattening"
        return layout, None
    if isinstance(module, (*ELEMENTWISE, nn.Dropout)):
        return layout, None
    return layout, "this kind of layer has no packed form"


class PackedConv2d(nn.Module):
    """K convolutions: stacked on the shared input, grouped on packed maps."""

    def __init__(self, members: Sequence[nn.Conv2d], shared_input: bool) -> None:
        super().__init__()
        first = members[0]
        self.k = len(members)
        self.shared_input = shared_input
        self.stride, self.padding, self.dilation = first.stride, first.padding, first.dilation
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in members]).contiguous())
        self.bias = (
            nn.Parameter(torch.cat([m.bias.detach() for m in members]).contiguous()) if first.bias is not None else None
        )

    foldable_conv = True  # training.plan.forward_plan may fold an eval-mode batch norm into it
    padding_mode = "zeros"

    @property
    def groups(self) -> int:
        return 1 if self.shared_input else self.k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.device.type in ("cpu", "cuda"):
            # The weights stay member-major (contiguous) for the optimizer; a channels-last copy
            # (small) makes the kernels produce channels-last maps even from a one-channel input.
            weight = weight.to(memory_format=torch.channels_last)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PackedLinear(nn.Module):
    """K linear layers as one batched matrix product over (K, N, F) features."""

    def __init__(self, members: Sequence[nn.Linear], shared_input: bool) -> None:
        super().__init__()
        self.k = len(members)
        self.shared_input = shared_input
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in members]).contiguous())  # (K, O, F)
        self.bias = (
            nn.Parameter(torch.stack([m.bias.detach() for m in members]).contiguous())
            if members[0].bias is not None
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_input:  # (N, F) -> every member's (N, O) in one product
            k, o, f = self.weight.shape
            out = (x @ self.weight.reshape(k * o, f).t()).view(x.shape[0], k, o).transpose(0, 1)
            return out if self.bias is None else out + self.bias.unsqueeze(1)
        if self.bias is None:
            return torch.bmm(x, self.weight.transpose(1, 2))
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class PackedFlatten(nn.Module):
    """(N, K*C, H, W) maps -> (K, N, C*H*W) features, each member flattened as its own Flatten would."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return x.reshape(n, self.k, -1, *x.shape[2:]).transpose(0, 1).reshape(self.k, n, -1)


class PackedDropSite(nn.Module):
    """One drop-site slot of K members, each at its own rate (0 where the member has it off).

    Each member also keeps its own dropout kind: element-wise, or whole feature maps ("channel",
    as nn.Dropout2d), so members that differ only in the kind of dropout share one pack.
    """

    def __init__(self, members: Sequence[DropSite], channel_dim: int) -> None:
        super().__init__()
        self.site_name = members[0].site_name
        self.kind = members[0].kind
        self.slot = members[0].slot
        self.channel_dim = channel_dim  # 1 for packed maps, 0 for packed features
        self.rates = [m.p or 0.0 for m in members]
        self.whole_maps = [m.dropout_kind == "channel" and channel_dim == 1 for m in members]
        self._masks: dict[tuple[int, torch.device], tuple[torch.Tensor, ...]] = {}

    def set_member(self, member: int, rate: float | None, whole_maps: bool = False) -> None:
        self.rates[member] = rate or 0.0
        self.whole_maps[member] = whole_maps and self.channel_dim == 1
        self._masks.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not any(self.rates):
            return x
        per_member = x.shape[self.channel_dim] // len(self.rates)
        key = (per_member, x.device)
        if key not in self._masks:
            repeat = per_member if self.channel_dim == 1 else 1
            element = [0.0 if whole else rate for rate, whole in zip(self.rates, self.whole_maps)]
            maps = [rate if whole else 0.0 for rate, whole in zip(self.rates, self.whole_maps)]
            self._masks[key] = (
                *masks.channel_rates(element, repeat, x.device), *masks.channel_rates(maps, repeat, x.device)
            )
        element_thresholds, element_scales, map_thresholds, map_scales = self._masks[key]
        if any(r and not w for r, w in zip(self.rates, self.whole_maps)):
            x = masks.dropout_per_channel(x, element_thresholds, element_scales, self.channel_dim)
        if any(r and w for r, w in zip(self.rates, self.whole_maps)):
            # One draw per image and map, broadcast over the map's pixels.
            keep = masks.dropout_per_channel(
                torch.ones(x.shape[0], x.shape[1], 1, 1, device=x.device, dtype=x.dtype),
                map_thresholds, map_scales, 1,
            )
            x = x * keep
        return x

    def extra_repr(self) -> str:
        return f"{self.site_name!r}, slot={self.slot}, rates={[round(r, 4) for r in self.rates]}"


class PackedBranchDrop(nn.Module):
    """One branch-drop site of K members on packed maps: each member drops its own images'
    branches at its own rate (0 where the member has it off)."""

    def __init__(self, members: Sequence[BranchDrop]) -> None:
        super().__init__()
        self.site_name = members[0].site_name
        self.kind = members[0].kind
        self.slot = members[0].slot
        self.rates = [m.p or 0.0 for m in members]
        self.whole_maps = [False] * len(members)  # what copy_sites_to reads of every packed site

    def set_member(self, member: int, rate: float | None, whole_maps: bool = False) -> None:
        self.rates[member] = rate or 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not any(self.rates):
            return x
        k = len(self.rates)
        keep = torch.tensor([1.0 - r for r in self.rates], device=x.device, dtype=x.dtype)
        kept = (torch.rand(x.shape[0], k, device=x.device, dtype=x.dtype) < keep).to(x.dtype)
        scale = kept / keep.clamp_min(torch.finfo(x.dtype).tiny)  # a member at rate 1 keeps nothing
        return x * scale.repeat_interleave(x.shape[1] // k, dim=1).view(x.shape[0], x.shape[1], 1, 1)

    def extra_repr(self) -> str:
        return f"{self.site_name!r}, residual branch, rates={[round(r, 4) for r in self.rates]}"


class PackedResidual(Residual):
    """K residual blocks on packed maps: each part packed as a flat model's layers are, the drop a
    :class:`PackedBranchDrop`."""


class _Softmax(nn.Module):
    """(Log-)softmax over the class dimension, which is the last one in packed features."""

    def __init__(self, log: bool) -> None:
        super().__init__()
        self.log = log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(x, dim=-1) if self.log else F.softmax(x, dim=-1)


@dataclass(frozen=True)
class _MemberKey:
    member_key: str  # key in one member's state dict
    packed_key: str  # key in the packed model's state dict
    shape: tuple[int, ...]  # the tensor's shape in one member
    shared: bool  # the same value for every member (batch norm's step counter, unused with a momentum)


class PackedNet(nn.Module):
    """K models of one flat architecture trained as one; outputs are (K, N, classes).

    The input is one batch shared by every member (N, C, H, W), or with ``member_inputs`` each
    member's own (N, K*C, H, W), member k's channels [k*C, (k+1)*C): the first convolution is then
    grouped like the later ones, so each member sees only its own images.
    """

    def __init__(self, members: Sequence[nn.Sequential], *, member_inputs: bool = False) -> None:
        super().__init__()
        if not members:
            raise ValueError("PackedNet needs at least one member, but got none.")
        problem = packing_problem(members[0], member_inputs=member_inputs)
        if problem:
            raise ValueError(f"cannot pack this model: {problem}.")
        self.k = len(members)
        self.member_inputs = member_inputs
        self._keys: list[_MemberKey] = []
        self.layers, _ = self._pack_sequence(list(members), _IMAGE, "", "layers.")
        self._site_layers = [m for m in self.layers.modules() if isinstance(m, (PackedDropSite, PackedBranchDrop))]

    def _pack_sequence(self, group: list[nn.Sequential], layout: str, member_prefix: str,
                       packed_prefix: str) -> tuple[nn.Sequential, str]:
        """Return the members' sequences packed layer by layer, and the layout after them; the
        member and packed names of every tensor are recorded in ``self._keys``."""
        names = [name for name, _ in group[0].named_children()]
        for other in group[1:]:
            if [name for name, _ in other.named_children()] != names:
                raise ValueError("every member of a pack must have the same layers.")
        layers: list[nn.Module] = []
        for index, name in enumerate(names):
            layer_group = [dict(m.named_children())[name] for m in group]
            if isinstance(layer_group[0], Residual):
                layers.append(self._pack_residual(layer_group, f"{member_prefix}{name}.", f"{packed_prefix}{index}."))
                continue
            packed, layout = self._pack_layer(layer_group, layout)
            layers.append(packed)
            for key, value in layer_group[0].state_dict().items():
                self._keys.append(_MemberKey(f"{member_prefix}{name}.{key}", f"{packed_prefix}{index}.{key}",
                                             tuple(value.shape), shared=value.dim() == 0))
        return nn.Sequential(*layers), layout

    def _pack_residual(self, group: list[nn.Module], member_prefix: str, packed_prefix: str) -> PackedResidual:
        parts = {}
        for part in ("pre", "branch", "shortcut"):
            sequences = [getattr(block, part) for block in group]
            parts[part] = None if sequences[0] is None else self._pack_sequence(
                sequences, _CONV, f"{member_prefix}{part}.", f"{packed_prefix}{part}.")[0]
        return PackedResidual(parts["pre"], parts["branch"], parts["shortcut"],
                              PackedBranchDrop([block.drop for block in group]))

    def _pack_layer(self, group: list[nn.Module], layout: str) -> tuple[nn.Module, str]:
        first = group[0]
        after, _ = _next_layout(layout, first)
        if isinstance(first, nn.Conv2d):
            return PackedConv2d(group, shared_input=layout == _IMAGE and not self.member_inputs), after
        if isinstance(first, nn.BatchNorm2d):
            bn = nn.BatchNorm2d(self.k * first.num_features, eps=first.eps, momentum=first.momentum,
                                affine=first.affine)
            with torch.no_grad():
                for name in ("weight", "bias", "running_mean", "running_var"):
                    target = getattr(bn, name)
                    if target is not None:
                        target.copy_(torch.cat([getattr(m, name).detach() for m in group]))
                bn.num_batches_tracked.copy_(first.num_batches_tracked)
            return bn, after
        if isinstance(first, nn.Linear):
            return PackedLinear(group, shared_input=layout == _FLAT), after
        if isinstance(first, nn.Flatten):
            return (PackedFlatten(self.k) if layout == _CONV else nn.Flatten()), after
        if isinstance(first, DropSite):
            return PackedDropSite(group, channel_dim=1 if layout == _CONV else 0), after
        if isinstance(first, (nn.LogSoftmax, nn.Softmax)):
            return _Softmax(isinstance(first, nn.LogSoftmax)), after
        return first, after  # stateless: elementwise, pooling, plain dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @property
    def site_names(self) -> list[str]:
        return list(dict.fromkeys(site.site_name for site in self._site_layers))

    def copy_sites_from(self, member: int, model: nn.Module) -> None:
        """Give member ``member`` the rates and kinds that ``model``'s drop sites are set to."""
        for packed, site in zip(self._site_layers, iter_sites(model), strict=True):
            packed.set_member(member, site.p, whole_maps=site.dropout_kind == "channel")

    def copy_sites_to(self, member: int, model: nn.Module) -> None:
        """Set ``model``'s drop sites to member ``member``'s rates and kinds."""
        for packed, site in zip(self._site_layers, iter_sites(model), strict=True):
            site.p = packed.rates[member] or None
            if isinstance(site, BranchDrop):
                site.dropout_kind = BRANCH
            else:
                site.dropout_kind = "channel" if packed.whole_maps[member] else "element"

    def silence(self, member: int) -> None:
        """Switch every site of member ``member`` off (the second half of an early-dropout run)."""
        for site in self._site_layers:
            site.set_member(member, None)

    def placement(self, member: int) -> dict[str, float | None]:
        """Return member ``member``'s rate at each site (None where off), whichever slot holds it."""
        found: dict[str, float | None] = dict.fromkeys(self.site_names)
        for site in self._site_layers:
            if site.rates[member]:
                found[site.site_name] = site.rates[member]
        return found

    def member_state_dict(self, member: int) -> dict[str, torch.Tensor]:
        """Return member ``member``'s weights and buffers under the names of the original model."""
        packed = self.state_dict()
        return {
            key.member_key: packed[key.packed_key].clone()
            if key.shared
            else packed[key.packed_key].view(self.k, -1)[member].reshape(key.shape).clone()
            for key in self._keys
        }

    def unpack(self, member: int, model: nn.Module) -> nn.Module:
        """Load member ``member`` into ``model`` (a fresh model of the packed architecture) and return it."""
        model.load_state_dict(self.member_state_dict(member))
        return model

    @torch.no_grad()
    def load_member(self, member: int, model: nn.Module) -> None:
        """Overwrite member ``member``'s weights and buffers with ``model``'s (same architecture)."""
        source = model.state_dict()
        packed = dict(self.named_parameters())
        packed.update(dict(self.named_buffers()))
        for key in self._keys:
            if key.shared:
                continue
            packed[key.packed_key].view(self.k, -1)[member].copy_(source[key.member_key].reshape(-1))

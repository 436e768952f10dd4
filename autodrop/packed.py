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
:class:`PackedAdam` keep a step count per member: a pruned member's slot can be handed to a fresh
trial at an epoch boundary, and the fresh trial trains exactly as it would alone. In eval mode a
packed model gives each member the outputs of the separate model with the same weights.

Only layers whose packed form is known are accepted (:func:`packing_problem` says which is not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from autodrop import masks
from autodrop.config import TrainConfig
from autodrop.data import ImageData
from autodrop.sites import DropSite, iter_sites
from autodrop.train import (
    EpochMetrics,
    Normaliser,
    Adam,
    TrialMetrics,
    autocast_for,
    eval_chunk_size,
    evaluate,
    forward_plan,
    prepare_device,
    use_channels_last,
)

# Layers that act on each channel or element alone, so the packed network can use them unchanged.
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity)
_SPATIAL = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)

# Layouts of the activations as they flow through the packed network.
_IMAGE, _FLAT, _CONV, _FC = "shared image", "shared flat", "packed maps", "packed features"


def packing_problem(model: nn.Module) -> str | None:
    """Return why ``model`` cannot be packed, or None if it can."""
    if not isinstance(model, nn.Sequential):
        return f"only flat nn.Sequential models can be packed, not {type(model).__name__}"
    layout = _IMAGE
    for name, module in model.named_children():
        layout, problem = _next_layout(layout, module)
        if problem:
            return f"layer {name!r} ({type(module).__name__}): {problem}"
    if layout not in (_FC,):
        return "the model must end in a linear layer's outputs"
    return None


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
    if isinstance(module, DropSite):
        if layout in (_IMAGE, _FLAT):
            return layout, "a drop site before the first layer with weights"
        return layout, None
    if isinstance(module, (nn.LogSoftmax, nn.Softmax)):
        if layout != _FC or module.dim not in (1, -1):
            return layout, "softmax over other than the class dimension"
        return layout, None
    if isinstance(module, _SPATIAL):
        if layout in (_FLAT, _FC):
            return layout, "pooling after flattening"
        return layout, None
    if isinstance(module, (*_ELEMENTWISE, nn.Dropout)):
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

    foldable_conv = True  # train.forward_plan may fold an eval-mode batch norm into it
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
    """K models of one flat architecture trained as one; outputs are (K, N, classes)."""

    def __init__(self, members: Sequence[nn.Sequential]) -> None:
        super().__init__()
        if not members:
            raise ValueError("PackedNet needs at least one member, but got none.")
        problem = packing_problem(members[0])
        if problem:
            raise ValueError(f"cannot pack this model: {problem}.")
        self.k = len(members)
        names = [name for name, _ in members[0].named_children()]
        for other in members[1:]:
            if [name for name, _ in other.named_children()] != names:
                raise ValueError("every member of a pack must have the same layers.")
        layers: list[nn.Module] = []
        keys: list[_MemberKey] = []
        layout = _IMAGE
        for index, name in enumerate(names):
            group = [dict(m.named_children())[name] for m in members]
            packed, layout = self._pack_layer(group, layout)
            layers.append(packed)
            for key, value in group[0].state_dict().items():
                packed_key = f"layers.{index}.{key}"
                keys.append(_MemberKey(f"{name}.{key}", packed_key, tuple(value.shape), shared=value.dim() == 0))
        self.layers = nn.Sequential(*layers)
        self._keys = keys
        self._site_layers = [m for m in layers if isinstance(m, PackedDropSite)]

    def _pack_layer(self, group: list[nn.Module], layout: str) -> tuple[nn.Module, str]:
        first = group[0]
        after, _ = _next_layout(layout, first)
        if isinstance(first, nn.Conv2d):
            return PackedConv2d(group, shared_input=layout == _IMAGE), after
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

    def plan(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Return the forward that train.forward_plan makes of the layers, for the current mode."""
        return forward_plan(self.layers, training=self.training)

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


class PackedAdam:
    """Adam over packed parameters with a step count per member, as torch.optim.Adam computes it.

    Each member's slice of each tensor is its own tensor to the Adam kernel (a view), so each
    member gets exactly the update a separate Adam would give it, in one fused call for all.
    ``reset_member`` zeroes one member's moments and step, for a fresh trial placed in that slot.
    """

    def __init__(self, params: Sequence[nn.Parameter], k: int, *, lr: float) -> None:
        self.params = list(params)
        self.k = k
        # Moments laid out as the parameters (member-major), handed to Adam as per-member views.
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self._adam = Adam(
            self._members([p.detach() for p in self.params]),
            lr=lr,
            moments=(self._members(self.exp_avg), self._members(self.exp_avg_sq)),
        )

    def _members(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Return each tensor's per-member views, tensor by tensor, member by member."""
        return [t.view(self.k, -1)[i] for t in tensors for i in range(self.k)]

    @property
    def steps(self) -> list[int]:
        """Each member's step count."""
        return [int(self._adam.steps[i]) for i in range(self.k)]

    def set_step(self, member: int, step: int) -> None:
        for j in range(len(self.params)):
            self._adam.steps[j * self.k + member].fill_(step)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def reset_member(self, member: int) -> None:
        self.set_step(member, 0)
        for state in (*self.exp_avg, *self.exp_avg_sq):
            state.view(self.k, -1)[member].zero_()

    def step(self) -> None:
        grads = [None if p.grad is None else p.grad.view(self.k, -1)[i] for p in self.params for i in range(self.k)]
        self._adam.step(grads)


@dataclass
class _Slot:
    """One member of a pack: which trial it trains and how far it got."""

    tag: object  # the caller's handle (an Optuna trial)
    epoch: int = 0


class PackTrainer:
    """Trains up to K trials at once, epoch by epoch, on shared batches; slots can be swapped.

    Every member sees the same batches in the same order (one permutation per pack epoch, from
    ``seed``). Between epochs, :meth:`update` takes finished or pruned members out and new trials
    in: a new trial takes a freed slot (its epoch 1 is the pack's next epoch), and the pack grows or
    shrinks (a repack, which keeps every member's weights, Adam state and step) when the counts differ.
    With ``config.schedule == "early"``, each member's dropout goes off after its own first half.
    """

    def __init__(self, data: ImageData, normaliser: Normaliser, config: TrainConfig, *, device: torch.device,
                 seed: int, build: Callable[[], nn.Module]) -> None:
        self.data, self.normaliser, self.config, self.device = data, normaliser, config, device
        self.build = build  # returns a fresh member model (weights are replaced when it joins)
        prepare_device(device)
        self.channels_last = use_channels_last(device)
        self.batch_generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout masks come from the global generator
        self.dropout_epochs = math.ceil(config.epochs / 2) if config.schedule == "early" else config.epochs
        self.slots: list[_Slot] = []
        self.net: PackedNet | None = None
        self.optimizer: PackedAdam | None = None

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def tags(self) -> list[object]:
        return [slot.tag for slot in self.slots]

    def epoch_of(self, tag: object) -> int:
        return self.slots[self._index(tag)].epoch

    def _index(self, tag: object) -> int:
        for i, slot in enumerate(self.slots):
            if slot.tag == tag:
                return i
        raise KeyError(tag)

    def set_members(self, members: Sequence[tuple[object, nn.Module]]) -> None:
        """Start a pack from scratch with these (tag, model) members; each model's drop sites
        already hold its placement (autodrop.sites.apply_placement)."""
        self.slots = [_Slot(tag) for tag, _ in members]
        if not members:
            self.net = self.optimizer = None
            return
        self.net = PackedNet([model for _, model in members]).to(self.device)
        self.optimizer = PackedAdam(list(self.net.parameters()), len(members), lr=self.config.lr)

    def update(self, done: Sequence[object], new: Sequence[tuple[object, nn.Module]]) -> None:
        """Take the ``done`` trials out and the ``new`` (tag, model) members in."""
        gone = [self._index(tag) for tag in done]
        if self.net is not None and len(gone) == len(new):  # new trials take the freed slots in place
            for i, (tag, model) in zip(gone, new):
                self.net.load_member(i, model)
                self.net.copy_sites_from(i, model)
                self.optimizer.reset_member(i)
                self.slots[i] = _Slot(tag)
            return
        self._repack([i for i in range(len(self.slots)) if i not in gone], list(new))

    def _repack(self, keep: list[int], new: list[tuple[object, nn.Module]]) -> None:
        """Pack the kept members (state and all) and the new ones into a model of the new size."""
        old_net, old_opt, old_slots = self.net, self.optimizer, self.slots
        members: list[tuple[object, nn.Module]] = []
        for i in keep:
            model = old_net.unpack(i, self.build())
            old_net.copy_sites_to(i, model)
            members.append((old_slots[i].tag, model))
        self.set_members(members + new)
        for new_i, old_i in enumerate(keep):
            self.slots[new_i] = old_slots[old_i]
        if not keep:
            return
        # Carry each kept member's Adam moments and step over to its new slot; the new ones start at 0.
        k = len(self.slots)
        index = torch.tensor(keep, device=self.device)
        for new_state, old_state in zip((*self.optimizer.exp_avg, *self.optimizer.exp_avg_sq),
                                        (*old_opt.exp_avg, *old_opt.exp_avg_sq)):
            new_state.view(k, -1)[: len(keep)].copy_(old_state.view(old_opt.k, -1).index_select(0, index))
        old_steps = old_opt.steps
        for new_i, old_i in enumerate(keep):
            self.optimizer.set_step(new_i, old_steps[old_i])

    def train_epoch(self) -> list[float]:
        """Train every member one epoch on shared batches; return each member's mean training loss."""
        assert self.net is not None and self.optimizer is not None
        net, data, k = self.net, self.data, len(self.slots)
        for i, slot in enumerate(self.slots):
            if slot.epoch >= self.dropout_epochs:  # "early dropout": off after the member's first half
                net.silence(i)
        net.train()
        n_train = len(data.train_labels)
        batch_size = min(self.config.batch_size, n_train)
        order = torch.randperm(n_train, generator=self.batch_generator).to(self.device)
        loss_sums = torch.zeros(k, device=self.device)
        n_batches = 0
        autocast = autocast_for(self.device)
        forward = net.plan()
        for start in range(0, n_train, batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:  # batch norm cannot train on a single image
                continue
            x = self.normaliser(data.train_images[index], self.channels_last)
            y = data.train_labels[index]
            with autocast:
                out = forward(x)
            losses = F.cross_entropy(out.float().reshape(k * len(y), -1), y.repeat(k), reduction="none")
            member_losses = losses.view(k, -1).mean(dim=1)
            # The sum of the members' mean losses: each member's gradient is its own loss's.
            self.optimizer.zero_grad()
            member_losses.sum().backward()
            self.optimizer.step()
            loss_sums += member_losses.detach()
            n_batches += 1
        for slot in self.slots:
            slot.epoch += 1
        return (loss_sums / max(n_batches, 1)).tolist()

    def finish(self, tag: object, last: EpochMetrics) -> tuple[TrialMetrics, nn.Module]:
        """Return a finished member's figures (the training set re-measured in eval mode) and its
        network as a separate model, with the member's weights and drop-site settings."""
        assert self.net is not None
        i = self._index(tag)
        model = self.net.unpack(i, self.build()).to(self.device)
        self.net.copy_sites_to(i, model)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        train_loss, train_accuracy = evaluate(model, self.data.train_images, self.data.train_labels,
                                              self.normaliser, self.device)
        return TrialMetrics(last.val_accuracy, last.val_loss, train_accuracy, train_loss, last.epoch), model

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, float]]:
        """Return each member's (mean loss, accuracy) in eval mode."""
        assert self.net is not None
        net, k = self.net, len(self.slots)
        net.eval()
        loss_sum = torch.zeros(k, device=self.device)
        correct = torch.zeros(k, device=self.device, dtype=torch.long)
        chunk = max(1, eval_chunk_size(self.device, images.shape[-1]) // k)
        with torch.inference_mode(), autocast_for(self.device):
            forward = net.plan()
            for start in range(0, len(labels), chunk):
                x = self.normaliser(images[start : start + chunk], self.channels_last)
                y = labels[start : start + chunk]
                logits = forward(x).float()  # (K, n, classes)
                losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(k), reduction="none")
                loss_sum += losses.view(k, -1).sum(dim=1)
                correct += (logits.argmax(dim=-1) == y).sum(dim=1)
        n = max(len(labels), 1)
        return [(float(s) / n, float(c) / n) for s, c in zip(loss_sum.tolist(), correct.tolist())]

    def epoch_metrics(self, train_losses: list[float]) -> list[EpochMetrics]:
        """Return each member's figures for the epoch just trained (validation in eval mode)."""
        val = self.evaluate(self.data.val_images, self.data.val_labels)
        return [
            EpochMetrics(slot.epoch, loss, val_loss, val_acc)
            for slot, loss, (val_loss, val_acc) in zip(self.slots, train_losses, val)
        ]


def auto_pack_size(device: torch.device, n_trials: int, *, n_workers: int = 1) -> int:
    """Return how many trials to pack on ``device``: several on a GPU, one (no packing) elsewhere.

    Measured on an H200 at 32x32 (issue 6): trial-images/s rose from K=1 to K=8 and flattened by
    K=16; eight members fill the card without making one pack's epoch too slow to prune quickly.
    Workers sharing one GPU split those eight between them.
    """
    if device.type != "cuda":
        return 1
    return max(1, min(8 // max(n_workers, 1), n_trials))


"""Cheap CPU dropout masks (autodrop.masks) and the drop site that uses them."""

from __future__ import annotations

import pytest
import torch

from autodrop.nets import masks
from autodrop.nets.sites import DropSite


def test_dropout_drops_the_asked_share_and_keeps_the_mean() -> None:
    torch.manual_seed(0)
    x = torch.ones(400, 500)
    y = masks.dropout(x, 0.3)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(0.3, abs=0.005)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)
    values = torch.unique(y).tolist()
    assert values == [0.0, pytest.approx(1 / (1 - masks.applied_rate(0.3)))]


def test_dropout_rate_zero_returns_the_input_unchanged() -> None:
    x = torch.randn(4, 5)
    assert masks.dropout(x, 0.0) is x


def test_dropout_gradient_is_the_same_mask() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = masks.dropout(x, 0.5)
    y.sum().backward()
    mask = torch.where(x.detach() != 0, y.detach() / x.detach(), 0.0)
    torch.testing.assert_close(x.grad, mask)


def test_dropout_keeps_channels_last_layout() -> None:
    x = torch.randn(8, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    assert masks.dropout(x, 0.2).is_contiguous(memory_format=torch.channels_last)


def test_rates_are_kept_to_one_in_65536() -> None:
    assert masks.applied_rate(0.1) == pytest.approx(0.1, abs=1 / 65536)
    assert masks.keep_threshold(0.5) == 0


def test_per_channel_rates_drop_each_channel_at_its_own_rate() -> None:
    torch.manual_seed(2)
    thresholds, scales = masks.channel_rates([0.0, 0.5, 0.9], repeat=2, device=torch.device("cpu"))
    x = torch.ones(2000, 6, 4, 4).contiguous(memory_format=torch.channels_last)
    y = masks.dropout_per_channel(x, thresholds, scales, channel_dim=1)
    dropped = (y == 0).float().mean(dim=(0, 2, 3))
    torch.testing.assert_close(dropped, torch.tensor([0.0, 0.0, 0.5, 0.5, 0.9, 0.9]), atol=0.01, rtol=0)
    # Each channel keeps its expected activation.
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.ones(6), atol=0.05, rtol=0)


def test_drop_site_uses_cheap_masks_on_cpu_and_is_identity_in_eval() -> None:
    site = DropSite("fc1", "fc")
    site.p = 0.5
    torch.manual_seed(3)
    x = torch.ones(100, 100)
    y = site(x)
    assert (y == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    site.eval()
    assert site(x) is x


def test_per_channel_scale_is_not_rounded_to_the_activations_bfloat16():
    torch.manual_seed(0)
    x = (torch.rand(1024, 4, 16, 16) + 0.5).to(torch.bfloat16)
    thresholds, scales = masks.channel_rates([0.3, 0.3], 2, torch.device("cpu"))
    out = masks.dropout_per_channel(x, thresholds, scales, 1)
    kept = out != 0
    ratio = (out.double()[kept] / x.double()[kept]).mean().item()
    # Each element is rounded to bfloat16 (unbiased on average); a scale rounded to bfloat16 first
    # would be 1.4297 instead of 1/0.7 = 1.42857 on every element.
    assert ratio == pytest.approx(1 / (1 - masks.applied_rate(0.3)), abs=2e-4)

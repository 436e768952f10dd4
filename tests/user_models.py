"""Networks written the way users write them, for the bring-your-own-network tests.

Each is loaded by path, as ``tests/user_models.py:NAME``, the way ``--model`` loads a user's file.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResidualNet(nn.Module):
    """A stem, one residual block written inline with functional activations, and a linear head."""

    def __init__(self, num_classes=10, in_channels=1, width=8):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.conv_a = nn.Conv2d(width, width, 3, padding=1)
        self.conv_b = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.stem(x))), 2)
        y = torch.relu(self.conv_a(x))
        y = self.conv_b(y)
        x = F.relu(x + y)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        x = F.dropout(x, 0.2, self.training)
        return self.head(x)


class BranchyNet(nn.Module):
    """A network torch.fx cannot trace: its forward branches on the data."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout2d(0.1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        if x.mean() > 100:  # data-dependent control flow
            x = x / 255
        x = self.pool(self.relu(self.conv1(x)))
        x = self.drop(x)
        x = self.pool(self.relu(self.conv2(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def make_residual(n_classes, width=4):
    """A factory function instead of a class."""
    return ResidualNet(num_classes=n_classes, width=width)


class LinearOnly(nn.Module):
    """No feature maps, no linear on 2-D input, no dropout: nothing to search."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return (x * self.scale).mean(dim=(2, 3))


class Broken(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        raise ValueError("width must be even")


class WrongOutputs(nn.Module):
    """Ignores num_classes: always 3 outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1), 1))


class BranchyViewNet(nn.Module):
    """Untraceable (it branches on the data) and flattens with .view, which channels-last breaks."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, x):
        if x.mean() > 100:
            x = x / 255
        x = F.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(x.view(x.size(0), -1))


class LogProbNet(nn.Module):
    """A small CNN whose output is log-probabilities (log_softmax), or raw scores with log_probs=False."""

    def __init__(self, num_classes=10, in_channels=1, image_size=16, log_probs=True):
        super().__init__()
        self.log_probs = log_probs
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8 * (image_size // 2) ** 2, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        x = self.fc(torch.flatten(x, 1))
        return F.log_softmax(x, dim=1) if self.log_probs else x


class WideBasic(nn.Module):
    """The wide-ResNet block as the paper's code writes it: bn, relu, conv, bn, relu, (dropout), conv,
    a 1x1 shortcut where the width changes."""

    def __init__(self, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal = in_planes == out_planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        y = self.conv1(out)
        y = F.relu(self.bn2(y))
        if self.drop_rate > 0:
            y = F.dropout(y, p=self.drop_rate, training=self.training)
        y = self.conv2(y)
        return y + (x if self.equal else self.shortcut(out))


class NetworkBlock(nn.Module):
    """A stage: ``n`` WideBasic blocks, the first one changing width and stride."""

    def __init__(self, n, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasic(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(n)
        ])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen as in Zagoruyko and Komodakis's code, small by default (WRN-10-1)."""

    def __init__(self, num_classes=10, in_channels=1, depth=10, widen=1, drop_rate=0.0):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1)
        return self.fc(torch.flatten(out, 1))

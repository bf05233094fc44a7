"""The primers' networks as plain torch models: what `fastdl demo`, the tests of fastdl.convert and the
whole-model benchmarks run. Each is written the way its source wrote it (F.relu calls in forward,
in-place residual adds), because that is what convert has to handle in users' code; DigitsMLP is
built from fastdl.nn directly, as a user starting with fastdl would.

    SimpleNN       Linear-ReLU-Linear
    SigmoidMLP     Linear-Sigmoid stacks trained with MSE (the from-scratch NumPy network)
    SimpleCNN      conv 3->32 3x3 pad 1, max pool 2, conv 32->64, max pool 2, fc 64*8*8 -> 10 (32x32 input)
    ResidualBlock  conv3x3-BN-ReLU-conv3x3-BN (+ 1x1 conv-BN shortcut when stride or channels change), add, ReLU
    SmallResNet    a stem and stages of ResidualBlocks, global average pooling, fc
    KerasCNN       conv32-pool-conv64-pool-conv64-flatten-dense64-dropout 0.5-dense10
    DigitsMLP      784 (or 64)-256-128-64-10 with dropout 0.3, from fastdl.nn (CrossEntropyLoss, Adam, clipping)
    ResNet, resnet18, resnet50   torchvision-free ResNet-18/50-style networks for the whole-model benchmarks
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SimpleNN(nn.Module):
    def __init__(self, in_features: int = 64, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


class SigmoidMLP(nn.Module):
    """The from-scratch NumPy network: sigmoid hidden and output layers, trained with MSE on one-hot targets."""

    def __init__(self, sizes=(64, 32, 10)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.layers:
            x = torch.sigmoid(layer(x))
        return x


class SimpleCNN(nn.Module):
    def __init__(self, in_channels: int = 3, classes: int = 10, image: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(64 * (image // 4) ** 2, classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, in_channels: int = 1, classes: int = 10, widths=(16, 32), blocks: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, channels = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                layers.append(ResidualBlock(channels, width, stride=2 if i > 0 and j == 0 else 1))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class KerasCNN(nn.Module):
    """conv32-pool-conv64-pool-conv64-flatten-dense64-dropout-dense10 (valid padding, as Keras' default)."""

    def __init__(self, in_channels: int = 1, classes: int = 10, image: int = 28, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3), nn.ReLU())
        side = ((image - 2) // 2 - 2) // 2 - 2
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 64), nn.ReLU(), nn.Dropout(dropout),
                                        nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def DigitsMLP(in_features: int = 784, classes: int = 10, dropout: float = 0.3) -> nn.Sequential:
    """in-256-128-64-classes with ReLU and dropout, built from fastdl.nn directly (activation and dropout
    fused into each hidden Linear)."""
    import fastdl.nn as fnn

    sizes = (in_features, 256, 128, 64)
    layers = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers.append(fnn.Linear(a, b, activation="relu", dropout=dropout))
    layers.append(fnn.Linear(sizes[-1], classes))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class Basic(ResidualBlock):
    expansion = 1


class ResNet(nn.Module):
    """ResNet-18/50-style for 224x224 images: 7x7/2 stem, 3x3/2 max pool, four stages, average pool, fc."""

    def __init__(self, block, counts, classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, channels = [], 64
        for i, count in enumerate(counts):
            width = 64 * 2 ** i
            blocks = []
            for j in range(count):
                blocks.append(block(channels, width, stride=2 if i > 0 and j == 0 else 1))
                channels = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18(classes: int = 1000) -> ResNet:
    return ResNet(Basic, (2, 2, 2, 2), classes)


def resnet50(classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), classes)

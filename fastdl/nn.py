"""Drop-in modules: torch.nn's constructors, parameters, initialization and state_dict keys.

Each subclasses its torch.nn counterpart, so `isinstance(m, torch.nn.Linear)` holds, state_dicts
load both ways, and initialization is torch's own; only forward runs fastdl's kernels.
"""
from __future__ import annotations

import torch

from fastdl import functional as _F


class Linear(torch.nn.Linear):
    """torch.nn.Linear with an optional fused activation (`activation=`, `negative_slope=`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 activation: str | None = None, negative_slope: float = 0.01):
        _F.check_activation("nn.Linear", activation)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _F.linear(input, self.weight, self.bias, activation=self.activation,
                         negative_slope=self.negative_slope)

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}" if self.activation else ""
        if self.activation == "leaky_relu":
            extra += f", negative_slope={self.negative_slope}"
        return super().extra_repr() + extra


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d (same constructor incl. padding_mode, parameters, init and state_dict) with an
    optional fused activation (`activation=`, `negative_slope=`). padding_mode other than "zeros"
    pads with torch.nn.functional.pad first, as torch's own Conv2d does."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 activation: str | None = None, negative_slope: float = 0.01):
        _F.check_activation("nn.Conv2d", activation)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = negative_slope

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        act = dict(activation=self.activation, negative_slope=self.negative_slope)
        if self.padding_mode != "zeros":
            padded = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return _F.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups, **act)
        return _F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups, **act)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}" if self.activation else ""
        if self.activation == "leaky_relu":
            extra += f", negative_slope={self.negative_slope}"
        return super().extra_repr() + extra


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss (same constructor, `weight` buffer and state_dict) on fastdl's fused kernel."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                reduction=self.reduction, label_smoothing=self.label_smoothing)


class MaxPool2d(torch.nn.MaxPool2d):
    """torch.nn.MaxPool2d (same constructor and attributes; no parameters or buffers) on fastdl's
    pooling kernels, which keep a 1-byte window position for backward instead of an 8-byte index."""

    def forward(self, input: torch.Tensor):
        return _F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                             ceil_mode=self.ceil_mode, return_indices=self.return_indices)

"""Drop-in modules: torch.nn's constructors, parameters, initialization and state_dict keys.

Each subclasses its torch.nn counterpart, so `isinstance(m, torch.nn.Linear)` holds, state_dicts
load both ways, and initialization is torch's own; only forward runs fastdl's kernels.
"""
from __future__ import annotations

import torch

from fastdl import functional as _F
from fastdl.functional.dropout import check_probability as _check_probability


class Linear(torch.nn.Linear):
    """torch.nn.Linear with an optional fused activation (`activation=`, `negative_slope=`) and dropout
    after it (`dropout=`, the drop probability, applied in training mode only, as nn.Dropout)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 activation: str | None = None, negative_slope: float = 0.01, dropout: float = 0.0):
        _F.check_activation("nn.Linear", activation)
        _check_probability("nn.Linear", dropout)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = negative_slope
        self.dropout = dropout

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _F.linear(input, self.weight, self.bias, activation=self.activation,
                         negative_slope=self.negative_slope, dropout=self.dropout, training=self.training)

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}" if self.activation else ""
        if self.activation == "leaky_relu":
            extra += f", negative_slope={self.negative_slope}"
        if self.dropout:
            extra += f", dropout={self.dropout}"
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


def _batch_norm_factor(num_batches_tracked: torch.Tensor, momentum: float | None, input: torch.Tensor) -> float:
    """The running statistics' update factor of the call about to run: momentum, or with momentum
    None the cumulative average's 1 / (batches so far, this one included). `input` only ties the call
    to a traced graph (torch.fx.wrap below records it, so the factor is computed at run time)."""
    return 1.0 / float(num_batches_tracked + 1) if momentum is None else momentum


def _count_batch(num_batches_tracked: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """num_batches_tracked += 1 once the call succeeded; recorded by fx after the call it counts."""
    num_batches_tracked.add_(1)
    return out


# fastdl's BatchNorm modules are not fx leaves (fx traces them into fastdl.functional.batch_norm): these
# two run in the traced graph instead of once, at trace time.
torch.fx.wrap("_batch_norm_factor")
torch.fx.wrap("_count_batch")


class _BatchNormAct:
    """forward of fastdl's BatchNorm1d/2d/3d: torch's _BatchNorm.forward (num_batches_tracked,
    momentum=None as a cumulative average, eval with or without running statistics,
    track_running_stats=False) on fastdl.functional.batch_norm, with the fused activation and an
    optional residual added before it (`forward(input, residual=None)`). num_batches_tracked is
    counted after the call succeeds (torch counts first), so a rejected input changes nothing."""

    # Set by fastdl.convert on a layer whose forward gets the residual add after it (shown in the repr).
    fused_residual = False

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 activation: str | None = None, negative_slope: float = 0.01):
        """torch's BatchNorm*d constructor (the class after this mixin), plus the extras."""
        _F.check_activation(f"nn.{type(self).__name__}", activation)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self._init_activation(activation, negative_slope)

    def _init_activation(self, activation, negative_slope):
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        tracing = isinstance(input, torch.fx.Proxy)
        if not tracing:  # under fx tracing the functional's checks run in the graph
            self._check_input_dim(input)
        counting = self.training and self.track_running_stats and self.num_batches_tracked is not None
        factor = 0.0 if self.momentum is None else self.momentum
        if counting:
            factor = _batch_norm_factor(self.num_batches_tracked, self.momentum, input)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        # A residual the kernels cannot take (another shape, so the add would broadcast; another dtype or
        # device) is added after the normalization with torch's ops, as the unfused `act(bn(x) + r)`.
        fused = residual is None or tracing or (
            isinstance(residual, torch.Tensor) and residual.shape == input.shape and residual.dtype == input.dtype
            and residual.device == input.device)
        out = _F.batch_norm(input, self.running_mean if use_buffers else None,
                            self.running_var if use_buffers else None, self.weight, self.bias, bn_training, factor,
                            self.eps, activation=self.activation if fused else None,
                            negative_slope=self.negative_slope, residual=residual if fused else None)
        if not fused:
            out = _F._TORCH_ACTIVATIONS[self.activation](out + residual, self.negative_slope)
        if counting:
            out = _count_batch(self.num_batches_tracked, out)
        return out

    def extra_repr(self) -> str:
        extra = ", residual fused" if self.fused_residual else ""
        extra += f", activation={self.activation!r}" if self.activation else ""
        if self.activation == "leaky_relu":
            extra += f", negative_slope={self.negative_slope}"
        return super().extra_repr() + extra


class BatchNorm1d(_BatchNormAct, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d (same constructor, parameters, buffers and state_dict) with an optional fused
    activation (`activation=`, `negative_slope=`) and residual (`forward(input, residual=None)`)."""


class BatchNorm2d(_BatchNormAct, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d (same constructor, parameters, buffers and state_dict) with an optional fused
    activation (`activation=`, `negative_slope=`) and residual (`forward(input, residual=None)`)."""


class BatchNorm3d(_BatchNormAct, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d (same constructor, parameters, buffers and state_dict) with an optional fused
    activation (`activation=`, `negative_slope=`) and residual (`forward(input, residual=None)`)."""


class SyncBatchNorm(_BatchNormAct, torch.nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm (same constructor incl. process_group, parameters, buffers, state_dict and
    convert_sync_batchnorm) with an optional fused activation and residual. In training under an
    initialized torch.distributed with more than one rank, the batch statistics are those of all
    ranks' batches together (fastdl.functional.sync_batch_norm: all_gather of each rank's mean,
    variance and count forward, all_reduce of the two per-channel gradient sums backward; a rank with
    an empty batch still joins); otherwise it is a BatchNorm. Unlike torch's, it also runs on CPU
    tensors (gloo), which is how it is tested on machines without a GPU."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 activation: str | None = None, negative_slope: float = 0.01):
        _F.check_activation("nn.SyncBatchNorm", activation)
        # torch's constructor directly: the mixin's takes BatchNorm*d's arguments (no process_group).
        torch.nn.SyncBatchNorm.__init__(self, num_features, eps, momentum, affine, track_running_stats, process_group,
                                        device, dtype)
        self._init_activation(activation, negative_slope)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        import torch.distributed as dist

        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        sync = (bn_training and self.training and group is not None and not isinstance(input, torch.fx.Proxy)
                and dist.get_world_size(group) > 1)
        if not sync:
            return super().forward(input, residual)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        from fastdl.functional.sync_batch_norm import sync_batch_norm

        counting = self.track_running_stats and self.num_batches_tracked is not None
        factor = 0.0 if self.momentum is None else self.momentum
        if counting:
            factor = _batch_norm_factor(self.num_batches_tracked, self.momentum, input)
        use_buffers = self.track_running_stats
        out = sync_batch_norm(input, self.running_mean if use_buffers else None,
                              self.running_var if use_buffers else None, self.weight, self.bias, factor, self.eps,
                              group, activation=self.activation, negative_slope=self.negative_slope, residual=residual)
        if counting:
            self.num_batches_tracked.add_(1)
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Every BatchNorm*d in `module` (torch's or fastdl's) as a fastdl SyncBatchNorm holding the same
        Parameter and buffer objects (and fastdl's fused activation, if any)."""
        result = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
            result = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                         process_group, activation=getattr(module, "activation", None),
                         negative_slope=getattr(module, "negative_slope", 0.01))
            if module.affine:
                with torch.no_grad():
                    result.weight, result.bias = module.weight, module.bias
            result.running_mean, result.running_var = module.running_mean, module.running_var
            result.num_batches_tracked = module.num_batches_tracked
            result.training = module.training
            if hasattr(module, "qconfig"):
                result.qconfig = module.qconfig
        for name, child in module.named_children():
            result.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return result

class Dropout(torch.nn.Dropout):
    """torch.nn.Dropout (same constructor, attributes and empty state_dict) on fastdl's counter-based
    kernels: nothing per element is kept for backward, which regenerates the mask from a seed."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _F.dropout(input, self.p, self.training, self.inplace)

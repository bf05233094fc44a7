"""fastdl.convert / fastdl.revert: an existing torch model on fastdl's kernels, with its fusions found.

    model = fastdl.convert(model)          # a new module tree on fastdl's layers; `model` is untouched
    model = fastdl.convert(model, inplace=True)
    original = fastdl.revert(model)

The swap. A module whose type is exactly one of torch.nn.Linear, Conv2d, BatchNorm1d/2d/3d,
SyncBatchNorm, MaxPool2d, Dropout and CrossEntropyLoss becomes fastdl.nn's class of the same name,
holding the same Parameter and buffer objects (an optimizer made before conversion keeps working,
and running statistics stay shared) under the same state_dict keys. A subclass of one of those types
is left as it is, with a warning naming it: a subclass may change what forward does (timm's
BatchNormAct2d does). Without inplace=True the given model is never modified: the converted tree is
made of new module objects that share its parameters and buffers.

The fusions (fuse=True), found by tracing the swapped model with torch.fx; no parameter changes:
  - an activation that is the only user of a Linear, Conv2d or BatchNorm output (nn.ReLU and friends,
    F.relu, torch.relu, Tensor.relu, leaky_relu, gelu, silu, sigmoid, tanh) runs inside that layer;
  - a residual add whose only BatchNorm input has no other user, and the activation after it, run inside
    that BatchNorm (ResNet's bn2 + shortcut + relu); if at run time the other operand does not have the
    BatchNorm output's shape (the add would broadcast), the call computes the unfused add instead;
  - an nn.Dropout that is the only user of a Linear output runs in that Linear's epilogue.
A layer called at more than one place in forward is not fused (its other calls would change).
Where tracing fails (data-dependent control flow, say) the swap alone is returned, with a warning
giving the reason. `print(model)` shows each fused layer's activation, residual and dropout.

fold_batchnorm=True (inference only: the model must be in eval mode, since folding changes the
parameters) folds each BatchNorm that is the only user of a Conv2d output into that convolution's
weight and bias.
"""
from __future__ import annotations

import copy
import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

import fastdl.nn as fnn

_SWAPS = {
    nn.Linear: fnn.Linear, nn.Conv2d: fnn.Conv2d, nn.BatchNorm1d: fnn.BatchNorm1d, nn.BatchNorm2d: fnn.BatchNorm2d,
    nn.BatchNorm3d: fnn.BatchNorm3d, nn.SyncBatchNorm: fnn.SyncBatchNorm, nn.MaxPool2d: fnn.MaxPool2d,
    nn.Dropout: fnn.Dropout, nn.CrossEntropyLoss: fnn.CrossEntropyLoss,
}
_FASTDL_TYPES = tuple(_SWAPS.values())
_BATCH_NORMS = (fnn.BatchNorm1d, fnn.BatchNorm2d, fnn.BatchNorm3d, fnn.SyncBatchNorm)

# The extras fastdl's modules add to torch's, with their defaults (set on a swapped module), and
# which class has which.
_EXTRAS = {"activation": None, "negative_slope": 0.01, "dropout": 0.0, "fused_residual": False}
# (fused_residual is a class attribute of fastdl's BatchNorms, False until a fusion sets it.)
_EXTRAS_OF = {fnn.Linear: ("activation", "negative_slope", "dropout"),
              **{cls: ("activation", "negative_slope") for cls in (fnn.Conv2d,) + _BATCH_NORMS}}


def _is_fastdl(module: nn.Module) -> bool:
    return type(module) in _FASTDL_TYPES


def _swap(module: nn.Module, cls) -> nn.Module:
    """A new `cls` object with module's attributes, sharing its Parameter and buffer objects."""
    # object.__new__: a GraphModule's class is made per instance by its __new__ (and holds its
    # forward); a copy must be of that very class.
    new = object.__new__(cls)
    new.__dict__ = dict(module.__dict__)
    for name in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
                 "_backward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
        if name in new.__dict__:
            new.__dict__[name] = copy.copy(new.__dict__[name])
    for name in _EXTRAS_OF.get(cls, ()):
        new.__dict__.setdefault(name, _EXTRAS[name])
    return new


def _swap_tree(module: nn.Module, inplace: bool, skipped: list, path: str = "") -> nn.Module:
    cls = _SWAPS.get(type(module))
    if cls is not None:
        node = _swap(module, cls)
    else:
        if type(module) not in _SWAPS and not _is_fastdl(module) and isinstance(module, tuple(_SWAPS)):
            skipped.append(f"{path or '<root>'} ({type(module).__module__}.{type(module).__qualname__})")
        node = module if inplace else _swap(module, type(module))
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        node._modules[name] = _swap_tree(child, inplace, skipped, f"{path}.{name}" if path else name)
    return node


def convert(model: nn.Module, *, fuse: bool = True, inplace: bool = False, fold_batchnorm: bool = False) -> nn.Module:
    """`model` on fastdl's layers, fused where its graph allows; see the module docstring."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastdl.convert: expected a torch.nn.Module, got {type(model).__name__}")
    if fold_batchnorm and model.training:
        raise ValueError("fastdl.convert: fold_batchnorm=True changes the convolutions' weights and is for "
                         "inference only; call it on model.eval()")
    skipped: list[str] = []
    swapped = _swap_tree(model, inplace, skipped)
    if skipped:
        warnings.warn("fastdl.convert: left as they are (subclasses of the layers fastdl replaces, which may "
                      "change what forward does): " + ", ".join(skipped), stacklevel=2)
    if not fuse and not fold_batchnorm:
        _remember(swapped, model)
        return swapped
    try:
        graph_module = fx.GraphModule(swapped, _Tracer().trace(swapped), type(model).__name__)
    except Exception as exc:  # noqa: BLE001 - any tracing failure falls back to the plain swap
        warnings.warn(f"fastdl.convert: torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: "
                      f"{exc}); returning the swapped model without fusions", stacklevel=2)
        _remember(swapped, model)
        return swapped
    if fold_batchnorm:
        _fold_batchnorm(graph_module)
    if fuse:
        _fuse(graph_module)
    graph_module.graph.lint()
    graph_module.recompile()
    graph_module.train(model.training)
    _remember(graph_module, model)
    return graph_module


def _remember(converted: nn.Module, source: nn.Module) -> None:
    # Not a registered submodule: the source's parameters are the converted model's own, and must
    # not appear twice in its state_dict or parameters().
    object.__setattr__(converted, "_fastdl_source", source)


def revert(model: nn.Module) -> nn.Module:
    """The torch model `model` was converted from (the same parameters and buffers, hence the trained
    values); for a model fastdl did not convert, a copy of its tree on torch's classes, sharing its
    parameters, provided nothing was fused into its layers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastdl.revert: expected a torch.nn.Module, got {type(model).__name__}")
    source = getattr(model, "_fastdl_source", None)
    if source is not None:
        return _unswap_tree(source) if _has_fastdl(source) else source
    return _unswap_tree(model)


def _has_fastdl(module: nn.Module) -> bool:
    return any(_is_fastdl(m) for m in module.modules())


def _unswap_tree(module: nn.Module) -> nn.Module:
    torch_cls = {cls: torch_cls for torch_cls, cls in _SWAPS.items()}.get(type(module))
    if torch_cls is not None:
        fused = [name for name, default in _EXTRAS.items() if module.__dict__.get(name, default) != default]
        if fused:
            raise ValueError(f"fastdl.revert: {type(module).__name__} has {', '.join(fused)} fused into it and "
                             "torch's layer has no such option; revert the model fastdl.convert returned instead")
        node = _swap(module, torch_cls)
        for name in _EXTRAS:
            node.__dict__.pop(name, None)
    else:
        node = _swap(module, type(module))
    for name, child in list(module._modules.items()):
        if child is not None:
            node._modules[name] = _unswap_tree(child)
    return node


# --- fusion on the fx graph ---

class _Tracer(fx.Tracer):
    """torch.fx's tracer with fastdl's layers, and the subclasses of the layers it replaces, as leaves:
    calls to them stay call_module nodes holding the module itself."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, tuple(_SWAPS)) or super().is_leaf_module(m, qualname)


def _own(gm: fx.GraphModule, target: str) -> nn.Module:
    """The layer at `target`, replaced in gm by a copy sharing its parameters, so what a fusion sets
    on it never reaches a module the caller holds (with inplace=True the caller's model holds the
    swapped layers, and its own forward still applies the activation)."""
    layer = _swap(gm.get_submodule(target), type(gm.get_submodule(target)))
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, layer)
    return layer

_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid",
                       nn.Tanh: "tanh", nn.GELU: "gelu"}
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.leaky_relu: "leaky_relu", F.gelu: "gelu",
                         F.silu: "silu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh",
                         F.tanh: "tanh", torch.relu_: "relu", F.relu_: "relu"}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                       "tanh": "tanh", "tanh_": "tanh"}
_ADDS = (operator.add, operator.iadd, torch.add)


def _activation_of(node: fx.Node, modules: dict) -> tuple[str, float] | None:
    """(activation, negative_slope) if `node` applies one fastdl can fuse, on its first argument only."""
    if node.op == "call_module":
        module = modules[node.target]
        name = _ACTIVATION_MODULES.get(type(module))
        if name is None or len(node.args) != 1 or node.kwargs:
            return None
        if name == "gelu":
            return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), 0.01
        if name == "leaky_relu":
            return name, float(module.negative_slope)
        return name, 0.01
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        name = _ACTIVATION_FUNCTIONS[node.target]
        args, kwargs = node.args[1:], dict(node.kwargs)
        kwargs.pop("inplace", None)
        if name == "leaky_relu":
            slope = args[0] if args else kwargs.pop("negative_slope", 0.01)
            args = args[1:]
            if isinstance(args[0] if args else None, fx.Node) or isinstance(slope, fx.Node):
                return None
            return (name, float(slope)) if not kwargs and not args[1:] else None
        if name == "gelu":
            approximate = kwargs.pop("approximate", "none")
            if args or kwargs:
                return None
            return ("gelu_tanh" if approximate == "tanh" else "gelu"), 0.01
        if name == "relu" and args and not isinstance(args[0], fx.Node):  # F.relu(x, inplace)
            args = ()
        return (name, 0.01) if not args and not kwargs else None
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS and len(node.args) == 1 and not node.kwargs:
        return _ACTIVATION_METHODS[node.target], 0.01
    return None


def _single_call_modules(graph: fx.Graph) -> set:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return {name for name, n in counts.items() if n == 1}


def _fusable_layer(node: fx.Node, modules: dict, once: set, kinds: tuple):
    if node.op != "call_module" or node.target not in once:
        return None
    module = modules[node.target]
    return module if isinstance(module, kinds) and _is_fastdl(module) else None


def _replace(node: fx.Node, by: fx.Node, graph: fx.Graph) -> None:
    node.replace_all_uses_with(by)
    graph.erase_node(node)


def _fuse(gm: fx.GraphModule) -> None:
    graph = gm.graph
    modules = dict(gm.named_modules())
    once = _single_call_modules(graph)
    # 1. residual add (+ activation) into the BatchNorm feeding it
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _ADDS or len(node.args) != 2 or node.kwargs:
            continue
        for i, side in enumerate(node.args):
            other = node.args[1 - i]
            bn = _fusable_layer(side, modules, once, _BATCH_NORMS) if isinstance(side, fx.Node) else None
            if bn is None or not isinstance(other, fx.Node) or len(side.users) != 1 or side.kwargs \
                    or bn.activation is not None or bn.fused_residual:
                continue
            act_node = next(iter(node.users)) if len(node.users) == 1 else None
            act = _activation_of(act_node, modules) if act_node is not None else None
            if act is not None and act_node.args[0] is not node:
                act = None
            bn = modules[side.target] = _own(gm, side.target)
            bn.fused_residual = True
            if act is not None:
                bn.activation, bn.negative_slope = act
            with graph.inserting_before(node):
                fused = graph.call_module(side.target, (side.args[0],), {"residual": other})
            last = act_node if act is not None else node
            _replace(last, fused, graph)
            if act is not None:
                graph.erase_node(node)
            graph.erase_node(side)
            break
    # 2. activation into the layer before it
    layers = (fnn.Linear, fnn.Conv2d) + _BATCH_NORMS
    for node in list(graph.nodes):
        layer = _fusable_layer(node, modules, once, layers)
        if layer is None or len(node.users) != 1 or layer.activation is not None:
            continue
        user = next(iter(node.users))
        act = _activation_of(user, modules)
        if act is None or user.args[0] is not node:
            continue
        layer = modules[node.target] = _own(gm, node.target)
        layer.activation, layer.negative_slope = act
        _replace(user, node, graph)
    # 3. nn.Dropout into the Linear before it
    for node in list(graph.nodes):
        layer = _fusable_layer(node, modules, once, (fnn.Linear,))
        if layer is None or len(node.users) != 1 or layer.dropout:
            continue
        user = next(iter(node.users))
        if user.op != "call_module" or not isinstance(modules[user.target], nn.Dropout) \
                or user.target not in once:
            continue
        layer = modules[node.target] = _own(gm, node.target)
        layer.dropout = float(modules[user.target].p)
        _replace(user, node, graph)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()


def _fold_batchnorm(gm: fx.GraphModule) -> None:
    """Conv2d followed by its only user, an eval-mode BatchNorm2d with running statistics: the
    convolution's weight and bias absorb the normalization (new Parameters on the conv)."""
    graph = gm.graph
    modules = dict(gm.named_modules())
    once = _single_call_modules(graph)
    for node in list(graph.nodes):
        conv = _fusable_layer(node, modules, once, (fnn.Conv2d,))
        if conv is None or len(node.users) != 1 or conv.activation is not None:
            continue
        user = next(iter(node.users))
        if user.op != "call_module" or user.target not in once or user.kwargs:
            continue
        bn = modules[user.target]
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or bn.training:
            continue
        conv = modules[node.target] = _own(gm, node.target)
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var.double() + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.double()
            shift = -bn.running_mean.double() * scale
            if bn.bias is not None:
                shift = shift + bn.bias.double()
            if conv.bias is not None:
                shift = shift + conv.bias.double() * scale
            weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
            conv.weight = nn.Parameter(weight.to(conv.weight.dtype))
            conv.bias = nn.Parameter(shift.to(conv.weight.dtype))
        _replace(user, node, graph)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()


def fused_summary(model: nn.Module) -> list[str]:
    """One line per layer with something fused into it (for `fastdl demo` and reports)."""
    lines = []
    for name, module in model.named_modules():
        parts = [f"{k}={module.__dict__[k]!r}" for k, default in _EXTRAS.items()
                 if k in module.__dict__ and module.__dict__[k] != default and k != "negative_slope"]
        if parts and _is_fastdl(module):
            lines.append(f"{name}: {type(module).__name__} + " + ", ".join(parts))
    return lines


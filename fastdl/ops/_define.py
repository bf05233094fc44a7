"""How a fastdl op becomes a torch op with autograd: the rules every op (linear, cross_entropy,
conv2d, batch_norm, ...) follows, and the helpers that enforce them.

One custom op per (op, backend), so the backend chosen at call time is part of the traced graph.
The triton variant is a `torch.library.triton_op` where torch has it, which lets torch.compile see
the Triton launches inside; the others are opaque `custom_op`s with a registered fake. Ops are
defined on first use (`fastdl.ops.get`): `torch.library.triton_op` imports torch._inductor (about
2.4 s, and it sets TORCHINDUCTOR_* variables), which `import fastdl` must not pay for.

The rules, for every op's autograd (`register_autograd` applies the first):

1. materialize_grads is off. An output nobody differentiated (a saved mask, a gradient an op
   returns beside its loss) comes to backward as None, never as a zero-filled tensor of its size;
   every backward handles None, and a None for the main output (with no other use) returns None
   gradients.
2. A backward never modifies what it saved, nor anything the caller holds: it writes new tensors
   (scaling a saved gradient writes grad_output * saved to a new tensor, the same bytes moved), so
   a second backward (retain_graph=True), torch.autograd.functional.jacobian and gradcheck work.
   An op may overwrite a buffer it allocated and nobody else sees (linear_cross_entropy's chunk).
3. Double backward. A backward that runs with grad mode on (`create_graph()`: backward(...,
   create_graph=True), torch.autograd.grad(..., create_graph=True)) must build a graph. Either the
   op's backward is written in differentiable torch ops on tensors autograd tracks
   (cross_entropy: its saved gradient is a differentiable output, and its own backward adds the
   Hessian-vector product), or it recomputes the forward with torch's differentiable ops from
   the saved inputs and differentiates that (`recompute_grads`: linear, linear_cross_entropy).
   fastdl's kernels serve first order, which is where the time goes; second order is torch's.
   Saving an op's inputs for this costs no memory beyond keeping them alive until backward.
4. Forward-mode AD and torch.func transforms go to the op's "torch" entry (fastdl.ops.get(op,
   "torch")): the same signature and outputs, computed with torch's own differentiable ops (the
   functional layer routes there; custom ops' autograd does not support functorch).
5. Accumulations across chunks or splits are float32 (float64 for float64), rounded once.
"""
from __future__ import annotations

import torch

# The backends that have kernels (a custom op each); "torch" is the plain-function entry.
BACKEND_NAMES = ("triton", "cupy", "reference")


def define(name: str, backend: str, fn, fake):
    qualname = f"fastdl::{name}_{backend}"
    if backend == "triton" and hasattr(torch.library, "triton_op"):
        return torch.library.triton_op(qualname, fn, mutates_args=())
    op = torch.library.custom_op(qualname, fn, mutates_args=())
    op.register_fake(fake)
    return op


def register_autograd(op, backward, setup_context) -> None:
    """op.register_autograd with materialize_grads off (rule 1): outputs nobody differentiated
    reach `backward` as None instead of as zero-filled tensors of their full size."""
    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        setup_context(ctx, inputs, output)

    op.register_autograd(backward, setup_context=setup)


def register_fused_autograd(fwd, bwd, torch_forward, saves_extra, saves_output, empty_saved: tuple) -> None:
    """Autograd of an op with a fused activation (linear, conv2d): inputs (input, weight, bias,
    *options) whose last two options are (activation, negative_slope); outputs (out, saved), `saved`
    being what the activation's derivative reads (kept when activation is in `saves_extra`; `out`
    is kept instead when it is in `saves_output`). The backward op takes (grad_out, input, weight,
    bias, saved, out, *options, needs_input_grad, needs_weight_grad, needs_bias_grad); with
    create_graph it recomputes torch_forward(input, weight, bias, *options) instead (rule 3).
    `empty_saved` is the shape of the empty tensor handed to the backward op when nothing was saved."""
    def setup_context(ctx, inputs, output):
        input, weight, bias, *options = inputs
        out, saved = output
        activation = options[-2]
        ctx.options = tuple(options)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, weight, bias,
                              saved if activation in saves_extra else None,
                              out if activation in saves_output else None)
        ctx.mark_non_differentiable(saved)

    def backward(ctx, grad_out, _grad_saved):
        no_options = (None,) * len(ctx.options)
        if grad_out is None:  # `saved` is not differentiable, so only `out` brings a gradient
            return (None,) * 3 + no_options
        input, weight, bias, saved, out = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        if create_graph():
            grads = recompute_grads(lambda x, w, b: torch_forward(x, w, b, *ctx.options),
                                    (input, weight, bias), needs, (grad_out,))
            return (*grads, *no_options)
        if saved is None:
            saved = grad_out.new_empty(empty_saved)
        grads = bwd(grad_out, input, weight, bias, saved, out, *ctx.options, *needs)
        return (*(g if need else None for g, need in zip(grads, needs)), *no_options)

    register_autograd(fwd, backward, setup_context)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of rule 5: float64 for float64, float32 for every other float dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def create_graph() -> bool:
    """Inside a backward: whether autograd is recording it (create_graph=True), so the gradients
    must carry a graph for a second differentiation (rule 3)."""
    return torch.is_grad_enabled()


def recompute_grads(torch_forward, inputs, needs_input_grad, grad_outputs) -> tuple:
    """Gradients of torch_forward(*inputs) w.r.t. the inputs that need them, with a graph (rule 3).

    torch_forward recomputes the op's differentiable outputs with torch's own ops from the saved
    inputs (which autograd restores with their history, so the graph reaches the caller's
    tensors); grad_outputs holds one gradient (or None) per output. Returns one gradient or None
    per input.
    """
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs_input_grad))
              if need and t is not None and t.requires_grad]
    if not wanted:
        return (None,) * len(inputs)
    with torch.enable_grad():
        outputs = torch_forward(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    if not pairs:
        return (None,) * len(inputs)
    grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                create_graph=True, allow_unused=True)
    result = [None] * len(inputs)
    for i, g in zip(wanted, grads):
        result[i] = g
    return tuple(result)


def or_empty(grads, like):
    """An op cannot return None: gradients nobody asked for come back as empty tensors."""
    return tuple(g if g is not None else like.new_empty((0,)) for g in grads)


def fake_dense_grads(input, weight, needs_input_grad: bool, needs_weight_grad: bool, needs_bias_grad: bool):
    """Fake (grad_input, grad_weight, grad_bias) of a dense layer, empty where not needed."""
    empty = input.new_empty((0,))
    return (input.new_empty(input.shape) if needs_input_grad else empty,
            weight.new_empty(weight.shape) if needs_weight_grad else empty,
            weight.new_empty((weight.shape[0],)) if needs_bias_grad else empty)

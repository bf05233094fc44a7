"""The GPU an autotune prune chooses configs for.

A config that is clean on one architecture may spill on another: the H100 (sm_90) keeps wgmma
accumulators in registers but its operands in shared memory, the A100 (sm_80) holds mma.sync's
operand fragments in registers too. Config lists are therefore per target, and a prune asks
`capability(tensor)` which list a launch may pick from:

  - a launch on a CUDA tensor: that device's compute capability;
  - while `fastdl.inspection` compiles for a named target on a machine without a GPU (its
    stand-in tensors have no device): the capability `compiling_for` set;
  - a CPU tensor (the interpreter): None, the lists as they are for every target.
"""
from __future__ import annotations

import contextlib

_compiling_for: tuple[int, int] | None = None
_by_device: dict[int, tuple[int, int]] = {}


@contextlib.contextmanager
def compiling_for(capability: tuple[int, int] | None):
    """Prunes choose for `capability` (e.g. (8, 0)) inside the block, whatever their tensors are."""
    global _compiling_for
    before, _compiling_for = _compiling_for, capability
    try:
        yield
    finally:
        _compiling_for = before


def capability(tensor) -> tuple[int, int] | None:
    """The compute capability the launch with this tensor argument compiles for (None: any)."""
    if _compiling_for is not None:
        return _compiling_for
    device = getattr(tensor, "device", None)
    if device is None or device.type != "cuda":
        return None
    index = device.index if device.index is not None else _current_device()
    if index not in _by_device:
        import torch

        _by_device[index] = tuple(torch.cuda.get_device_capability(index))
    return _by_device[index]


def _current_device() -> int:
    import torch

    return torch.cuda.current_device()


def is_sm80_class(cap: tuple[int, int] | None) -> bool:
    """mma.sync targets (Ampere and Ada, compute capability 8.x): operand fragments in registers."""
    return cap is not None and cap[0] < 9

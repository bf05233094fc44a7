"""Backend selection.

A backend is a module with launchers (`linear_fwd`, `linear_bwd`, ...). The active backend is
chosen by `use_backend`; without one, CUDA tensors go to triton and CPU tensors to reference.
A backend that cannot run where it is asked raises; nothing falls back silently.
"""
from __future__ import annotations

import importlib
import os
import sys

import torch

BACKENDS = ("triton", "cupy", "reference")

_selected: str | None = None


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"fastdl: unknown backend {name!r}; expected one of {BACKENDS}")


class use_backend:
    """Select the backend for every fastdl op.

    Works both as a plain call (``fastdl.use_backend("cupy")`` sets it until changed) and as a
    context manager (``with fastdl.use_backend("reference"): ...`` restores the previous choice).
    ``None`` restores the per-device default.
    """

    def __init__(self, name: str | None):
        global _selected
        if name is not None:
            _check_name(name)
        self._previous = _selected
        _selected = name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _selected
        _selected = self._previous
        return False


def selected_backend() -> str | None:
    return _selected


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _importable(module: str) -> bool:
    if module in sys.modules:
        return True
    return importlib.util.find_spec(module) is not None


def available_backends() -> list[str]:
    """Backends that can run on this machine, in order of preference."""
    names = []
    if _importable("triton") and (torch.cuda.is_available() or triton_interpreting()):
        names.append("triton")
    if torch.cuda.is_available() and _importable("cupy"):
        names.append("cupy")
    names.append("reference")
    return names


def resolve(device: torch.device) -> str:
    """The backend name an op on `device` runs with; raises if it cannot run there."""
    name = _selected
    if name is None:
        return "triton" if device.type == "cuda" else "reference"
    if name == "cupy" and device.type != "cuda":
        raise RuntimeError(f"fastdl: the cupy backend runs on CUDA tensors only, got a {device.type} tensor")
    if name == "triton" and device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(
            f"fastdl: the triton backend runs {device.type} tensors only under Triton's interpreter; "
            "set TRITON_INTERPRET=1 before triton is imported, or use the reference backend"
        )
    if name == "triton" and device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"fastdl: the triton backend cannot run on {device.type} tensors")
    return name


def get(name: str):
    """The launcher module of a backend (imported on first use)."""
    _check_name(name)
    return importlib.import_module(f"fastdl.backends.{name}")

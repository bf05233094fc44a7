"""Backend selection.

A backend is a module with launchers (`linear_fwd`, `linear_bwd`, ...). The active backend is
chosen by `use_backend`; without one, CUDA tensors go to triton and CPU tensors to reference.
A backend that cannot run where it is asked raises; nothing falls back silently.

The choice is per thread, as torch.no_grad and autocast are: a thread starts with no selection
(the per-device default), and what one thread selects never changes what another runs. An op's
backward runs the backend its forward ran (the backend is part of the custom op's name), so
autograd's own worker threads need no selection.
"""
from __future__ import annotations

import importlib
import os
import sys
import threading

import torch

BACKENDS = ("triton", "cupy", "reference")


class _Selection(threading.local):
    # (name, owner): name is the selected backend or None; owner is the token of the use_backend
    # call that set it, which tells a context manager whether the selection is still its own.
    value: tuple[str | None, object] = (None, None)


_selection = _Selection()


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"fastdl: unknown backend {name!r}; expected one of {BACKENDS}")


class use_backend:
    """Select the backend for every fastdl op run by this thread.

    Works both as a plain call (``fastdl.use_backend("cupy")`` sets it for this thread until
    changed) and as a context manager (``with fastdl.use_backend("reference"): ...`` restores the
    previous choice on exit). ``None`` restores the per-device default (triton for CUDA tensors,
    reference for CPU tensors).

    The constructor selects (that is the plain-call form). Entered right after construction, as in
    ``with use_backend(...)``, the block restores what was selected before the object was made; an
    object kept and entered later, several times, nested or from other threads, restores what was
    selected when each ``with`` began.
    """

    def __init__(self, name: str | None):
        if name is not None:
            _check_name(name)
        self._name = name
        self._token = object()
        self._before_construction = _selection.value
        self._restore = threading.local()  # per thread: a stack of selections to restore, one per open `with`
        _selection.value = (name, self._token)

    def _stack(self) -> list:
        stack = getattr(self._restore, "stack", None)
        if stack is None:
            stack = self._restore.stack = []
        return stack

    def __enter__(self):
        if _selection.value[1] is self._token:
            # The selection is still the one the constructor made, in this thread: this `with`
            # undoes the construction. Re-own it with a fresh token so a nested or later entry of
            # this object is an ordinary one.
            self._stack().append(self._before_construction)
            _selection.value = (self._name, object())
        else:
            self._stack().append(_selection.value)
            _selection.value = (self._name, object())
        return self

    def __exit__(self, *exc):
        _selection.value = self._stack().pop()
        return False

    def __repr__(self):
        return f"fastdl.use_backend({self._name!r})"


def selected_backend() -> str | None:
    """The backend this thread selected, or None for the per-device default."""
    return _selection.value[0]


_interpreting: bool | None = None  # known for good once triton is imported


def triton_interpreting() -> bool:
    """Whether Triton runs kernels through its interpreter.

    Triton decides at its first import: its own library functions (tl.cdiv, tl.sigmoid, ...) are
    made interpreted or compiled then, whatever TRITON_INTERPRET says later. So once triton is
    imported this asks triton; before, it is what triton will read.
    """
    global _interpreting
    if _interpreting is not None:
        return _interpreting
    if "triton" not in sys.modules:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    try:
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction
        _interpreting = isinstance(standard.cdiv, InterpretedFunction)
    except (ImportError, AttributeError):  # pragma: no cover - a triton without these names
        _interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return _interpreting


def _importable(module: str) -> bool:
    if module in sys.modules:
        return True
    return importlib.util.find_spec(module) is not None


def _triton_unusable_here(device_type: str) -> str | None:
    """Why the triton backend cannot run `device_type` tensors on this machine, or None if it can."""
    if device_type == "cuda":
        return None if _importable("triton") else "fastdl: the triton backend needs the triton package (pip install triton)"
    if device_type != "cpu":
        return f"fastdl: the triton backend cannot run on {device_type} tensors; use fastdl.use_backend('reference')"
    if triton_interpreting():
        return None
    chosen = os.environ.get("TRITON_INTERPRET")
    if chosen is None or chosen == "1":
        return ("fastdl: triton was imported before fastdl without TRITON_INTERPRET=1, so its kernels cannot run "
                f"on {device_type} tensors; set the environment variable TRITON_INTERPRET=1 before anything "
                "imports triton (or import fastdl first), or use fastdl.use_backend('reference')")
    return (f"fastdl: TRITON_INTERPRET={chosen} is set, so Triton's kernels cannot run on "
            f"{device_type} tensors (they need its interpreter); set TRITON_INTERPRET=1 before anything imports "
            "triton, or use fastdl.use_backend('reference')")


def available_backends() -> list[str]:
    """Backends that can run on this machine, in order of preference."""
    names = []
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if _importable("triton") and _triton_unusable_here(device_type) is None:
        names.append("triton")
    if torch.cuda.is_available() and _importable("cupy"):
        names.append("cupy")
    names.append("reference")
    return names


def resolve(device: torch.device) -> str:
    """The backend name an op on `device` runs with; raises if it cannot run there."""
    name = _selection.value[0]
    if name is None:
        return "triton" if device.type == "cuda" else "reference"
    if name == "cupy" and device.type != "cuda":
        raise RuntimeError(f"fastdl: the cupy backend runs on CUDA tensors only, got a {device.type} tensor; "
                           "use fastdl.use_backend('reference') (or None, the per-device default)")
    if name == "triton" and device.type != "cuda":
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"fastdl: compiled Triton kernels need CUDA tensors; under torch.compile on a {device.type} tensor "
                "use fastdl.use_backend('reference') (the triton backend runs CPU tensors only eagerly, through "
                "Triton's interpreter)")
        reason = _triton_unusable_here(device.type)
        if reason is not None:
            raise RuntimeError(reason)
    return name


def get(name: str):
    """The launcher module of a backend (imported on first use)."""
    _check_name(name)
    return importlib.import_module(f"fastdl.backends.{name}")

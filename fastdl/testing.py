"""What every fastdl comparison uses: one tolerance table, one comparison, one input maker.

Shared by the tests, `fastdl verify` and the benchmarks' sanity checks.
"""
from __future__ import annotations

import numpy as np
import torch

# (rtol, atol) per dtype of the kernel's inputs. atol is relative to the largest magnitude of the
# expected tensor (a dot product's rounding error grows with the size of its terms, not of its sum),
# so one entry serves outputs and gradients of any scale.
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 1e-5),
    "tf32": (1e-2, 5e-3),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (5e-2, 1e-2),
}


def tolerance(dtype: torch.dtype, tf32: bool = False) -> tuple[float, float]:
    if dtype == torch.float32 and tf32:
        return TOLERANCES["tf32"]
    return TOLERANCES[dtype]


def compare(actual: torch.Tensor, expected, dtype: torch.dtype, tf32: bool = False, name: str = "") -> dict:
    """Errors of `actual` against the float64 `expected` (array or tensor); never raises."""
    expected = torch.as_tensor(np.asarray(expected) if not isinstance(expected, torch.Tensor) else expected)
    expected = expected.to("cpu", torch.float64)
    actual = actual.detach().to("cpu", torch.float64)
    rtol, atol = tolerance(dtype, tf32)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    diff = (actual - expected).abs()
    bound = atol * scale + rtol * expected.abs()
    shape_ok = actual.shape == expected.shape
    ok = shape_ok and bool((diff <= bound).all()) and not bool(torch.isnan(actual).any() ^ torch.isnan(expected).any())
    max_abs = diff.max().item() if shape_ok and diff.numel() else 0.0
    rel = diff / expected.abs().clamp_min(atol * scale)
    max_rel = rel.max().item() if shape_ok and rel.numel() else 0.0
    return dict(name=name, ok=ok, max_abs=max_abs, max_rel=max_rel, rtol=rtol, atol=atol * scale)


def assert_close(actual: torch.Tensor, expected, dtype: torch.dtype, tf32: bool = False, name: str = "") -> None:
    result = compare(actual, expected, dtype, tf32, name)
    if not result["ok"]:
        raise AssertionError(
            f"{name}: shape {tuple(actual.shape)}, max abs err {result['max_abs']:.3g} "
            f"(atol {result['atol']:.3g}), max rel err {result['max_rel']:.3g} (rtol {result['rtol']:.3g})")


def make_tensor(shape, dtype=torch.float32, device="cpu", *, seed: int = 0, scale: float = 1.0,
                noncontiguous: bool = False, requires_grad: bool = False) -> torch.Tensor:
    """Non-uniform random data: rows and columns of different scale and offset, never all zeros.

    noncontiguous=True returns a view with a last-dimension stride of 2 holding the same values.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    if len(shape) >= 2:
        rows = torch.exp(0.5 * torch.randn(shape[:-1] + (1,), generator=gen, dtype=torch.float64))
        cols = 0.2 * torch.randn(shape[-1:], generator=gen, dtype=torch.float64)
        t = t * rows + cols
    t = (t * scale).to(dtype)
    if noncontiguous and len(shape) >= 1:
        wide = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=dtype)
        wide[..., ::2] = t
        t = wide[..., ::2]
    t = t.to(device)
    return t.requires_grad_(requires_grad)


def gpu_backends(launcher: str, names=("triton", "cupy", "reference")) -> list[str]:
    """Backends to parametrize GPU tests with: those having `launcher`, and available where CUDA is."""
    import fastdl
    from fastdl import backends

    if torch.cuda.is_available():
        names = [b for b in names if b in fastdl.available_backends()]

    def has(name):
        try:
            return hasattr(backends.get(name), launcher)
        except ImportError:
            return False

    return [b for b in names if has(b)]

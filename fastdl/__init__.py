"""fastdl: hand-written Triton and CUDA kernels for MLP/CNN layers, checked against float64 NumPy.

    import fastdl
    layer = fastdl.nn.Linear(784, 256, activation="relu")    # drop-in for torch.nn.Linear
    y = fastdl.functional.linear(x, w, b, activation="gelu")
    with fastdl.use_backend("cupy"): ...
"""
from fastdl import ops  # noqa: F401  (registers torch.ops.fastdl.*)
from fastdl import functional, nn
from fastdl.backends import available_backends, use_backend

__version__ = "0.1.0"
__all__ = ["functional", "nn", "use_backend", "available_backends", "__version__"]

import os
import tempfile

import pytest
import torch

# Triton reads this when it is first imported: without a GPU its kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# NVRTC compiles (fastdl/nvrtc.py) kept between the tests, and runs, that compile the same module
# for the same target (test_cuda_compile, test_cuda_conv2d, test_inspection's CUDA rows): keyed by
# the whole source text, so an edited kernel is compiled anew.
os.environ.setdefault("FASTDL_NVRTC_CACHE", os.path.join(tempfile.gettempdir(), f"fastdl-nvrtc-{os.getuid()}"))

HAS_CUDA = torch.cuda.is_available()
GPU_SKIP_REASON = "needs a CUDA GPU; this machine has none (the GPU suite runs through bench/gpu_check.sh)"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""SyncBatchNorm across two processes (gloo on loopback, CPU): two ranks on halves of a batch give
what one process gives on the whole batch: outputs, input and residual gradients, the parameters'
gradients summed over ranks, and the running statistics on every rank."""
from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdl

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch was built without torch.distributed's gloo backend")

# (name, input shape, channels_last, dtype, activation, residual, rank 0's share of the batch)
CASES = [
    ("nchw relu+residual", (6, 5, 4, 3), False, torch.float64, "relu", True, 3),
    ("channels_last plain", (5, 7, 3, 3), True, torch.float32, None, False, 2),
    ("2-D, rank 1 empty", (6, 4), False, torch.float64, "silu", False, 6),
]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(shape, channels_last, dtype, residual):
    g = torch.Generator().manual_seed(7)
    C = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) if residual else None
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    rm = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, r, grad, w, b, rm, rv


def _module(C, dtype, activation, w, b, rm, rv, sync: bool):
    cls = fastdl.nn.SyncBatchNorm if sync else fastdl.nn.BatchNorm2d
    m = cls(C, momentum=0.3, dtype=dtype, activation=activation)
    m._check_input_dim = lambda input: None  # BatchNorm2d serves the 2-D case too here
    with torch.no_grad():
        m.weight.copy_(w), m.bias.copy_(b), m.running_mean.copy_(rm), m.running_var.copy_(rv)
    return m


def _run(m, x, r, grad, steps=2):
    """Two training steps (the second sees the first's running statistics); the outputs and grads of the last."""
    for _ in range(steps):
        m.zero_grad()
        xg = x.detach().clone().requires_grad_()
        rg = r.detach().clone().requires_grad_() if r is not None else None
        out = m(xg, residual=rg) if rg is not None else m(xg)
        out.backward(grad)
    return dict(out=out.detach(), grad_input=xg.grad, grad_residual=rg.grad if rg is not None else None,
                grad_weight=m.weight.grad, grad_bias=m.bias.grad, running_mean=m.running_mean.clone(),
                running_var=m.running_var.clone(), num_batches_tracked=m.num_batches_tracked.clone())


def _worker(rank, world, port, backend, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with fastdl.use_backend(backend):
            for i, (_, shape, channels_last, dtype, activation, residual, share) in enumerate(CASES):
                x, r, grad, w, b, rm, rv = _data(shape, channels_last, dtype, residual)
                part = slice(0, share) if rank == 0 else slice(share, shape[0])
                m = _module(shape[1], dtype, activation, w, b, rm, rv, sync=True)
                got = _run(m, x[part], r[part] if r is not None else None, grad[part])
                torch.save(got, os.path.join(out_dir, f"{i}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=["reference", "triton"])
def ranks(request):
    backend = request.param
    if backend == "triton" and "triton" not in fastdl.available_backends():
        pytest.skip("the triton backend cannot run here (Triton's interpreter is off)")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(2, _free_port(), backend, out_dir), nprocs=2, join=True,
                           start_method="spawn")
        yield backend, {(i, rank): torch.load(os.path.join(out_dir, f"{i}-{rank}.pt"))
                        for i in range(len(CASES)) for rank in range(2)}


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_two_ranks_equal_one_process(ranks, case):
    backend, results = ranks
    _, shape, channels_last, dtype, activation, residual, share = CASES[case]
    x, r, grad, w, b, rm, rv = _data(shape, channels_last, dtype, residual)
    whole = _run(_module(shape[1], dtype, activation, w, b, rm, rv, sync=False), x, r, grad)
    tol = TOL[dtype]
    r0, r1 = results[(case, 0)], results[(case, 1)]
    for name in ("out", "grad_input", "grad_residual"):
        if whole[name] is None:
            continue
        torch.testing.assert_close(torch.cat([r0[name], r1[name]]), whole[name], **tol, msg=name)
    for name in ("grad_weight", "grad_bias"):  # each rank's own share, as torch's SyncBatchNorm returns them
        torch.testing.assert_close(r0[name] + r1[name], whole[name], **tol, msg=name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        for rank_result in (r0, r1):
            torch.testing.assert_close(rank_result[name], whole[name], **tol, msg=name)


def test_convert_sync_batchnorm_keeps_parameters_and_state_dict():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                fastdl.nn.BatchNorm2d(4, activation="relu"))
    params = list(model.parameters())
    converted = fastdl.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is fastdl.nn.SyncBatchNorm and type(converted[2]) is fastdl.nn.SyncBatchNorm
    assert converted[2].activation == "relu"
    assert all(a is b for a, b in zip(converted.parameters(), params))
    reference = torch.nn.SyncBatchNorm.convert_sync_batchnorm(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)))
    assert list(converted.state_dict()) == list(reference.state_dict())


def test_without_a_process_group_it_is_a_batch_norm():
    """Not distributed (or one rank, or eval): torch's SyncBatchNorm falls back to batch_norm; so does fastdl's."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    ours, theirs = fastdl.nn.SyncBatchNorm(3, dtype=torch.float64), torch.nn.BatchNorm2d(3, dtype=torch.float64)
    with fastdl.use_backend("reference"):
        for train in (True, False):
            ours.train(train), theirs.train(train)
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-10, atol=1e-12)

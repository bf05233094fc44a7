"""Whole-model benchmarks: one training step (forward, backward, optimizer step) of a ResNet-18/50-style
network and of the digits MLP, the torch original against its fastdl.convert twin (each backend) and
torch.compile of the original; images per second and memory.

    fastdl bench --ops models          (on a GPU: bf16, channels_last, ResNets at batch 64 / 224x224)

Every provider starts from the same initialization (a deep copy of one model) and runs the same
batches. Memory is read from torch's caching allocator: `peak_bytes` is the step's peak, and
`activation_bytes` that peak minus what was allocated just before the step (parameters, gradients
and optimizer state stay allocated between steps), i.e. what forward keeps for backward plus the
backward's temporaries. The issue's target on an H200: the converted ResNet-50 step >= 1.15x torch
eager at <= 0.8x its activation memory. On a machine without a GPU `run(device="cpu")` runs the same
code at toy sizes on the reference backend (what tests/test_bench_models.py checks), never timed as
a claim.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastdl
from fastdl import models

PROVIDERS = ("torch", "torch-compile", "fastdl-triton", "fastdl-cupy", "fastdl-reference")


def plain_mlp(in_features: int = 784, classes: int = 10, dropout: float = 0.3) -> nn.Sequential:
    """DigitsMLP's architecture in plain torch layers (what convert starts from)."""
    sizes = (in_features, 256, 128, 64)
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
    layers.append(nn.Linear(sizes[-1], classes))
    return nn.Sequential(*layers)


# name -> (model factory, input shape per image, classes, batch on a GPU); TOY: the image on CPU (batch 2)
MODELS = {
    "resnet50": (lambda: models.resnet50(1000), (3, 224, 224), 1000, 64),
    "resnet18": (lambda: models.resnet18(1000), (3, 224, 224), 1000, 128),
    "mlp": (lambda: plain_mlp(784, 10), (1, 28, 28), 10, 4096),
}
TOY = {"resnet50": (3, 32, 32), "resnet18": (3, 32, 32), "mlp": (1, 28, 28)}


def _available(provider: str, device: str) -> str | None:
    """Why `provider` cannot run on `device`, or None."""
    if provider == "torch":
        return None
    if provider == "torch-compile":
        return None if device == "cuda" else "torch.compile is measured on the GPU only"
    backend = provider.split("-", 1)[1]
    if device == "cuda" and backend == "reference":
        return "the float64 oracle is not a contender on the GPU"
    if device == "cpu" and backend != "reference":
        return f"the {backend} backend's speed is only meaningful on a GPU"
    if backend not in fastdl.available_backends():
        return f"the {backend} backend is not available here"
    return None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _make_step(provider: str, base: nn.Module, batches: list, device: str):
    model = copy.deepcopy(base)
    backend = None
    if provider.startswith("fastdl-"):
        backend = provider.split("-", 1)[1]
        model = fastdl.convert(model)
    elif provider == "torch-compile":
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(i: int) -> torch.Tensor:
        x, y = batches[i % len(batches)]
        with fastdl.use_backend(backend):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
        opt.step()
        return loss.detach()

    return step, model


def measure(name: str, provider: str, *, device: str, dtype: torch.dtype, batch: int, image: tuple,
            warmup: int, reps: int, seed: int = 0) -> dict:
    factory, _, classes, _ = MODELS[name]
    torch.manual_seed(seed)
    fmt = torch.channels_last if len(image) == 3 else torch.contiguous_format
    base = factory().to(device=device, dtype=dtype, memory_format=fmt)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batches = [(torch.randn((batch,) + image, generator=gen).to(device=device, dtype=dtype,
                                                               memory_format=fmt),
                torch.randint(0, classes, (batch,), generator=gen).to(device)) for _ in range(2)]
    record = dict(model=name, provider=provider, device=device, dtype=str(dtype).replace("torch.", ""),
                  batch=batch, image=list(image), layout="channels_last" if len(image) == 3 else "contiguous")
    why = _available(provider, device)
    if why:
        return dict(record, skipped=why)
    step, _ = _make_step(provider, base, batches, device)
    losses = [float(step(i)) for i in range(warmup)]
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = []
    for i in range(reps):
        start = time.perf_counter()
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        loss = step(warmup + i)
        if device == "cuda":
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            times.append(time.perf_counter() - start)
        losses.append(float(loss))
    seconds = statistics.median(times)
    record.update(step_ms=seconds * 1e3, images_per_s=batch / seconds, losses=losses)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        record.update(peak_bytes=peak, activation_bytes=peak - before)
    return record


def run(out_dir: str = "bench-results", names=None, *, device: str | None = None, quick: bool = False,
        warmup: int = 3, reps: int = 10) -> dict:
    """Measure every (model, provider) pair into out_dir/models.json; ratios to torch eager per model."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    names = list(names or MODELS)
    records = []
    for name in names:
        _, image, _, batch = MODELS[name]
        if device == "cpu":
            image, batch = TOY[name], 2
        elif quick:
            batch = max(batch // 4, 1)
        rows = [measure(name, p, device=device, dtype=dtype, batch=batch, image=image, warmup=warmup, reps=reps)
                for p in PROVIDERS]
        base = next(r for r in rows if r["provider"] == "torch")
        for r in rows:
            if "step_ms" in r:
                r["speedup_vs_torch"] = base["step_ms"] / r["step_ms"]
                if "activation_bytes" in r and base.get("activation_bytes"):
                    r["activation_memory_vs_torch"] = r["activation_bytes"] / base["activation_bytes"]
            print(_line(r), flush=True)
        records += rows
    data = dict(schema=1, kind="models", device=device,
                gpu=torch.cuda.get_device_name() if device == "cuda" else None,
                date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), torch=torch.__version__, records=records)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "models.json"), "w") as f:
        json.dump(data, f, indent=1)
    return data


def _line(r: dict) -> str:
    head = f"{r['model']:<9} {r['provider']:<16} batch {r['batch']:<5}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    mem = f" act {r['activation_bytes'] / 2**20:8.0f} MiB" if "activation_bytes" in r else ""
    return f"{head} {r['step_ms']:9.2f} ms {r['images_per_s']:9.0f} img/s {r.get('speedup_vs_torch', 0):5.2f}x{mem}"

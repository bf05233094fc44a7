"""`fastdl demo`: one of the primers' networks trained on scikit-learn's handwritten digits, the torch
original and its fastdl.convert twin side by side from the same initialization.

The digits (1797 8x8 grayscale images, 10 classes) ship inside scikit-learn, so the demo needs no
download: `pip install "fastdl[demo]"` brings scikit-learn, tqdm and matplotlib. It prints the test
accuracy of both models and the largest difference between their training losses, and writes
loss curves and the converted model's confusion matrix as PNG, with the data behind them as JSON.
"""
from __future__ import annotations

import copy
import json
import os
import time

import torch
import torch.nn.functional as F

MODELS = ("mlp", "cnn", "resnet")
DEFAULT_EPOCHS = {"mlp": 15, "cnn": 12, "resnet": 6}


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"fastdl demo needs {module.split('.')[0]}: pip install \"fastdl[demo]\" "
                         "(scikit-learn, tqdm and matplotlib)") from None


def load_digits(device, seed: int = 0):
    """(x_train, y_train, x_test, y_test): images (N, 1, 8, 8) scaled to [0, 1], a stratified 80/20 split."""
    datasets = _require("sklearn.datasets")
    selection = _require("sklearn.model_selection")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    train, test = selection.train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=digits.target)
    train, test = torch.tensor(train), torch.tensor(test)
    return x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device)


def make_model(name: str):
    from fastdl import models

    if name == "mlp":
        return models.SimpleNN(64, 128, 10)
    if name == "cnn":
        return models.SimpleCNN(1, 10, 8)
    if name == "resnet":
        return models.SmallResNet(1, 10, (16, 32), blocks=1)
    raise ValueError(f"fastdl demo: unknown model {name!r}; expected one of {MODELS}")


def _accuracy(model, x, y, batch: int = 512) -> tuple[float, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    model.train()
    return (pred == y).float().mean().item(), pred


def run(model_name: str = "mlp", epochs: int | None = None, backend: str | None = None, out_dir: str = "demo-out",
        batch_size: int = 64, seed: int = 0, progress: bool = True) -> dict:
    import fastdl

    tqdm = _require("tqdm").tqdm
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = backend or ("triton" if device.type == "cuda" else "reference")
    epochs = epochs or DEFAULT_EPOCHS[model_name]
    x_train, y_train, x_test, y_test = load_digits(device, seed)
    torch.manual_seed(seed)
    original = make_model(model_name).to(device)
    converted = fastdl.convert(copy.deepcopy(original))
    optimizers = [torch.optim.Adam(m.parameters(), lr=2e-3) for m in (original, converted)]
    history = {"original": [], "converted": []}
    generator = torch.Generator().manual_seed(seed)
    steps = (len(x_train) + batch_size - 1) // batch_size
    bar = tqdm(total=epochs * steps, disable=not progress, desc=f"{model_name} ({backend})", unit="step")
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=generator).to(device)
        for i in range(steps):
            idx = order[i * batch_size:(i + 1) * batch_size]
            xb, yb = x_train[idx], y_train[idx]
            for key, model, opt in (("original", original, optimizers[0]), ("converted", converted, optimizers[1])):
                opt.zero_grad()
                with fastdl.use_backend(backend if key == "converted" else None):
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                opt.step()
                history[key].append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{history['converted'][-1]:.4f}", epoch=epoch + 1)
        if progress:
            with fastdl.use_backend(backend):
                acc, _ = _accuracy(converted, x_test, y_test)
            bar.set_postfix(loss=f"{history['converted'][-1]:.4f}", epoch=epoch + 1, test_acc=f"{acc:.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    acc_original, _ = _accuracy(original, x_test, y_test)
    with fastdl.use_backend(backend):
        acc_converted, pred = _accuracy(converted, x_test, y_test)
    confusion = torch.zeros(10, 10, dtype=torch.int64)
    confusion.index_put_((y_test.cpu(), pred.cpu()), torch.ones(len(pred), dtype=torch.int64), accumulate=True)
    diff = max(abs(a - b) for a, b in zip(history["original"], history["converted"]))
    result = {
        "model": model_name, "backend": backend, "device": str(device), "epochs": epochs, "batch_size": batch_size,
        "seconds": round(seconds, 2), "test_accuracy": {"original": acc_original, "converted": acc_converted},
        "max_loss_difference": diff, "fused": _fused(converted),
        "loss": history, "confusion_matrix": confusion.tolist(),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"demo-{model_name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    result["plots"] = _plot(result, out_dir)
    return result


def _fused(model) -> list[str]:
    from fastdl.convert import fused_summary

    return fused_summary(model)


def _plot(result: dict, out_dir: str) -> list[str]:
    matplotlib = _require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = result["model"]
    paths = [os.path.join(out_dir, f"demo-{name}-loss.png"), os.path.join(out_dir, f"demo-{name}-confusion.png")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("original", "-"), ("converted", "--")):
        ax.plot(result["loss"][key], style, label=f"{key} ({'torch' if key == 'original' else result['backend']})")
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title=f"{name} on the digits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    matrix = result["confusion_matrix"]
    image = ax.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", xticks=range(10), yticks=range(10),
           title=f"converted {name}: test accuracy {result['test_accuracy']['converted']:.3f}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def main(args) -> int:
    result = run(args.model, args.epochs, args.backend, args.out, progress=not args.quiet)
    acc = result["test_accuracy"]
    print(f"{result['model']}: {result['epochs']} epochs in {result['seconds']} s on {result['device']} "
          f"(converted model on the {result['backend']} backend)")
    print("fused: " + ("; ".join(result["fused"]) or "nothing"))
    print(f"test accuracy: torch {acc['original']:.4f}, fastdl {acc['converted']:.4f}")
    print(f"largest difference between the two models' training losses: {result['max_loss_difference']:.3g}")
    print("wrote " + ", ".join([os.path.join(args.out, f"demo-{result['model']}.json")] + result["plots"]))
    return 0

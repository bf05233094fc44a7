"""`fastdl demo` on scikit-learn's digits: the converted model learns as the torch original does."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install 'fastdl[demo]')")
pytest.importorskip("tqdm", reason="the demo needs tqdm (pip install 'fastdl[demo]')")

from fastdl import cli, demo  # noqa: E402


# The CNN with batches of 32 for 3 epochs: 96% here in under half a minute (the demo's default, 12
# epochs of 64, reaches 98.6% in 42 s).
@pytest.mark.parametrize("model,epochs,batch_size", [("mlp", None, 64), ("cnn", 3, 32)])
def test_demo_trains_both_models_alike(tmp_path, model, epochs, batch_size):
    result = demo.run(model, epochs=epochs, backend="reference", out_dir=str(tmp_path), batch_size=batch_size,
                      progress=False)
    acc = result["test_accuracy"]
    assert acc["converted"] >= 0.95, acc
    assert abs(acc["converted"] - acc["original"]) <= 0.01, acc
    assert result["fused"], "the primer's activations should be fused into its layers"
    saved = json.loads((tmp_path / f"demo-{model}.json").read_text())
    assert len(saved["loss"]["converted"]) == len(saved["loss"]["original"]) > 0
    assert sum(map(sum, saved["confusion_matrix"])) == 360  # the held-out fifth of 1797 digits
    for path in result["plots"]:
        assert (tmp_path / path.split("/")[-1]).stat().st_size > 1000


def test_demo_command_line(tmp_path, capsys):
    assert cli.main(["demo", "--model", "mlp", "--epochs", "1", "--quiet", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy: torch" in printed and "fused: fc1: Linear + activation='relu'" in printed

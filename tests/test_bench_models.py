"""The whole-model benchmark's code path at toy sizes on CPU (the reference backend for the converted
model): every provider is either measured or skipped with a reason, the converted model trains like
the original, and the JSON is written. Times here are not claims; the GPU run makes those."""
from __future__ import annotations

import json

import pytest

from fastdl.bench import models as bench_models


@pytest.mark.parametrize("name", ["mlp", "resnet18"])
def test_models_bench_runs_on_cpu(tmp_path, name):
    data = bench_models.run(str(tmp_path), [name], device="cpu", warmup=1, reps=1)
    rows = {r["provider"]: r for r in data["records"]}
    assert set(rows) == set(bench_models.PROVIDERS)
    assert all("step_ms" in r or r.get("skipped") for r in rows.values())
    torch_losses, fastdl_losses = rows["torch"]["losses"], rows["fastdl-reference"]["losses"]
    if name == "resnet18":
        # No dropout: the same first loss. Later steps drift apart at this toy size (batch 2 at 32x32
        # leaves 2 values per channel to the last stage's batch norm, which amplifies rounding).
        assert fastdl_losses[0] == pytest.approx(torch_losses[0], rel=1e-5)
    assert all(loss == loss for loss in fastdl_losses)
    assert rows["fastdl-reference"]["speedup_vs_torch"] > 0
    saved = json.loads((tmp_path / "models.json").read_text())
    assert saved["kind"] == "models" and len(saved["records"]) == len(bench_models.PROVIDERS)

"""The two console commands: `fastdl verify` exits non-zero on any failing row; `fastdl bench`
says plainly that it needs a GPU instead of failing obscurely."""
import json

import pytest
import torch

from fastdl import cli, verify


def test_verify_reference_rows_pass_and_write_json(tmp_path, capsys):
    path = tmp_path / "verify.json"
    assert cli.main(["verify", "--backends", "reference", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert rows and all(r["status"] == "pass" for r in rows)
    assert {"op", "backend", "dtype", "shape", "check", "max_abs", "max_rel"} <= set(rows[0])
    assert "passed, 0 failed" in capsys.readouterr().out


def test_verify_exits_nonzero_on_a_failing_row(monkeypatch, capsys):
    def wrong(backend, dtype, device):
        yield verify.compare_row("linear", backend, dtype, "3x3", "out", torch.ones(3), torch.zeros(3))

    monkeypatch.setattr(verify, "CHECKS", {"linear": wrong})
    assert cli.main(["verify", "--backends", "triton", "--ops", "linear"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed where there is no GPU")
def test_bench_without_gpu_says_so(tmp_path, capsys):
    assert cli.main(["bench", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err

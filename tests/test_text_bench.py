"""benchmarks/text.py on a tiny BERT on the CPU: its oracle reproduces the model, its rows are
complete, and it never overwrites results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")


def load_benchmark():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "text.py"
    spec = importlib.util.spec_from_file_location("text_benchmark", script)
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = benchmark  # dataclasses look their module up
    spec.loader.exec_module(benchmark)
    return benchmark


def test_the_text_benchmark_runs_tiny_and_never_overwrites(tmp_path, capsys):
    benchmark = load_benchmark()
    out = tmp_path / "text.json"
    variants = "none,pitome@1,oracle@0.7/first3,pitome@0.7/first3,tome@0.9/all"
    args = ["--tiny", "--quick", "--variants", variants, "--rounds", "1", "--repeats", "2",
            "--json", str(out)]
    assert benchmark.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    batches = {(row["lengths"], row["batch"]) for row in rows}
    assert batches == {("uniform", 8), ("unpadded", 8), ("uniform", 1)}
    assert {row["variant"] for row in rows} == set(variants.split(","))
    for row in rows:
        assert row["mode"] == "eager" and row["forward_ms"] > 0 and row["error"] is None, row
        if row["variant"] == "none":
            assert row["speedup"] == pytest.approx(1.0)
    assert "| tiny | uniform | 8 | eager | pitome@0.7/first3 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists"):
        benchmark.main(args)


def test_the_text_oracle_keeps_the_schedules_token_counts():
    benchmark = load_benchmark()
    import torch

    shape = benchmark.MODELS["tiny"]
    base = benchmark.build_model(shape, torch.device("cpu"), torch.float32)
    batch = benchmark.TextBatch.of(benchmark.draw_lengths("uniform", 4), torch.device("cpu"))
    assert benchmark.check_oracle(base, batch) < 1e-4


def test_a_bad_variant_names_the_allowed_forms():
    benchmark = load_benchmark()
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--variants", "pitome@0.7/middle"])

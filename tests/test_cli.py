"""The ``pitome`` command line, on a tiny model so it runs in seconds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pitome.cli import main

TINY_MODEL = "vit_tiny_patch16_224"


def test_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "pitome.cli", "--help"], capture_output=True,
                            text=True, check=True)
    assert "bench" in result.stdout and "algorithms" in result.stdout


def test_bench_prints_a_table(capsys):
    assert main(["bench", "--model", TINY_MODEL, "--batch", "2", "--warmup", "0",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "img/s" in lines[1] and "GFLOPs" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert set(rows) == {"none", "tome", "pitome"}
    assert rows["none"][2] == "197" and rows["pitome"][2] == rows["tome"][2] == "60"
    assert float(rows["pitome"][3]) < 0.7 * float(rows["none"][3])


def test_bench_json(capsys):
    main(["bench", "--model", TINY_MODEL, "--batch", "1", "--warmup", "0", "--repeats", "1",
          "--algos", "none,pitome_paper", "--ratio", "0.95", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert [row["algo"] for row in report["rows"]] == ["none", "pitome_paper"]
    assert report["rows"][0]["speedup"] == 1.0
    assert report["rows"][1]["tokens_out"] < 197
    assert report["setup"]["weights"] == "random weights"


def test_bench_rejects_unknown_algorithms():
    with pytest.raises(SystemExit, match="unknown algorithm"):
        main(["bench", "--model", TINY_MODEL, "--algos", "none,nope"])


def test_algorithms_command(capsys):
    assert main(["algorithms"]) == 0
    assert "pitome_paper" in capsys.readouterr().out

"""The ``pitome`` command line, on a tiny model so it runs in seconds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

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


def bench_row(algo: str, images_per_s: float, host_ms: float | None):
    from pitome.bench import BenchRow

    return BenchRow(algo=algo, ratio=0.9, tokens_out=60, gflops=1.0, merge_gflops=0.0,
                    images_per_s=images_per_s, speedup=1.0, forward_ms=1e3 / images_per_s,
                    host_ms=host_ms)


def test_bench_table_stars_rows_the_host_bounds():
    from pitome.bench import BenchSetup, format_table

    setup = BenchSetup(model="m", device="cuda", dtype="bfloat16", batch=1, weights="random")
    gpu_bound, host_bound = bench_row("none", 1000.0, 0.3), bench_row("tome", 500.0, 1.9)
    assert not gpu_bound.host_bound and host_bound.host_bound
    lines = format_table([gpu_bound, host_bound], setup).splitlines()
    assert lines[1].endswith("ms/forward  host ms")
    assert lines[3].split()[-2:] == ["1.00", "0.30"]
    assert lines[4].split()[-2:] == ["2.00", "1.90*"]
    assert lines[-1].startswith("* host-bound") and "--cuda-graph" in lines[-1]
    on_cpu = format_table([bench_row("none", 1000.0, None)], setup)
    assert "host ms" not in on_cpu and "host-bound" not in on_cpu


def test_launch_time_is_for_gpus():
    from pitome.bench import launch_time

    assert launch_time(lambda: None, torch.device("cpu"), 3) is None


def test_algorithms_command(capsys):
    assert main(["algorithms"]) == 0
    assert "pitome_paper" in capsys.readouterr().out


def test_flops_command(capsys):
    assert main(["flops", "--model", TINY_MODEL, "--algo", "tome"]) == 0
    out = capsys.readouterr().out
    assert "torch.utils.flop_counter" in out and out.count("\n") > 14


def small_image_folder(root, count=2):
    from PIL import Image

    folder = root / "n00000001"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        pixels = (torch.rand(240, 260, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{index}.png")
    return root


def test_spectrum_command(tmp_path, capsys):
    folder = small_image_folder(tmp_path / "images")
    assert main(["spectrum", "--model", TINY_MODEL, "--images", str(folder), "--algos",
                 "pitome_paper,tome", "--limit", "2", "--ratio", "0.9", "--random-weights"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "spectral distance" in lines[0]
    assert "from input" in lines[1]
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == 12 and all(float(row[1]) > 0 for row in rows)
    # block, 2 x (mean ± std), 2 cumulative columns; the first merge is all of the input's.
    assert all(len(row) == 9 for row in rows)
    assert float(rows[0][7]) == pytest.approx(float(rows[0][1]), abs=1e-3)


def test_visualize_command(tmp_path):
    """Each panel paints every merged group of patches in the group's mean colour: read
    back, its patches fall into 197 → 60 tokens' worth of groups (59 besides CLS, ρ = 0.9
    over 12 blocks), each coloured with the mean of its patches in the input panel, and a
    dark line separates neighbouring patches of different groups."""
    import numpy as np
    from PIL import Image

    # A smooth two-way gradient: every patch has its own colour, and so (almost surely)
    # does every group of patches.
    ramp = np.linspace(0, 255, 224)
    pixels = np.stack([ramp[None, :].repeat(224, 0), ramp[:, None].repeat(224, 1),
                       np.full((224, 224), 90.0)], axis=-1).astype(np.uint8)
    image = tmp_path / "gradient.png"
    Image.fromarray(pixels).save(image)
    out = tmp_path / "merges.png"
    assert main(["visualize", str(image), "--model", TINY_MODEL, "--algos", "pitome,tome",
                 "--out", str(out), "--random-weights"]) == 0
    with Image.open(out) as picture:
        assert picture.size == (3 * 224 + 2 * 8, 224 + 16)
        strip = np.asarray(picture.convert("RGB"), dtype=np.float64)[16:]
    patches = strip[:, :224].reshape(14, 16, 14, 16, 3)
    patch_means = patches.mean(axis=(1, 3)).reshape(196, 3)
    assert np.ptp(patch_means, axis=0)[:2].min() > 150  # the input panel is the gradient
    for panel in (1, 2):
        painted = strip[:, panel * 232:panel * 232 + 224]
        centres = painted[7::16, 7::16].reshape(196, 3)  # away from the group boundaries
        colours, group = np.unique(centres, axis=0, return_inverse=True)
        group = group.reshape(-1)
        assert len(colours) == 59, panel
        for index, colour in enumerate(colours):
            assert np.abs(patch_means[group == index].mean(axis=0) - colour).max() <= 1.0
        ids = group.reshape(14, 14)
        # The last pixel column of patch (r, c) is dark exactly where (r, c + 1) differs.
        boundary = painted[7::16, 15:223:16].max(axis=-1)
        assert np.array_equal(boundary < 30, ids[:, :-1] != ids[:, 1:]), panel


def test_bench_rounds_time_each_method_again(monkeypatch):
    from pitome import bench

    timed = []
    monkeypatch.setattr(bench, "time_forward", lambda run, *args: timed.append(run) or 0.01)
    main(["bench", "--model", TINY_MODEL, "--batch", "1", "--warmup", "0", "--repeats", "1",
          "--algos", "none,tome", "--rounds", "3", "--json"])
    assert len(timed) == 6 and len(set(timed[:3])) == 1 and len(set(timed[3:])) == 1
    with pytest.raises(SystemExit):
        main(["bench", "--model", TINY_MODEL, "--rounds", "0"])


def test_bench_modes_time_each_mode_and_say_which_to_use(monkeypatch, capsys):
    from dataclasses import replace

    from pitome import bench

    calls = []

    def fake_benchmark(model, algos, ratio, batch, device, dtype, cuda_graph=False,
                       compile=False, **options):
        calls.append((cuda_graph, compile))
        speed = 300.0 if compile else 100.0
        return [replace(bench_row(algo, speed * (2 if algo == "tome" else 1), None),
                        speedup=2.0 if algo == "tome" else 1.0) for algo in algos]
    monkeypatch.setattr(bench, "benchmark", fake_benchmark)
    assert main(["bench", "--model", TINY_MODEL, "--algos", "none,tome",
                 "--modes", "eager,compile"]) == 0
    assert calls == [(False, False), (False, True)]
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["algo", "mode"]
    assert [line.split()[:2] for line in lines[3:7]] == [
        ["none", "eager"], ["tome", "eager"], ["none", "compile"], ["tome", "compile"]]
    assert lines[-1] == ("fastest here: tome in compile mode, 600.0 img/s (2.00x the unmerged "
                         "model run the same way), 2.00x the fastest unmerged row (compile). "
                         "To run it so: torch.compile(model) (or mode=\"reduce-overhead\" for "
                         "CUDA graphs inside).")
    main(["bench", "--model", TINY_MODEL, "--algos", "none,tome", "--modes", "compile",
          "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["setup"]["modes"] == ["compile"]
    assert {row["mode"] for row in report["rows"]} == {"compile"}


@pytest.mark.parametrize("arguments,message", [
    (["--modes", "eager,fast"], "--modes 'eager,fast': choose from eager, compile, cuda-graph"),
    (["--modes", " , "], "choose from eager, compile, cuda-graph"),
    (["--modes", "eager,eager"], "names a mode more than once"),
    (["--modes", "cuda-graph", "--device", "cpu"], "--modes cuda-graph needs a CUDA device"),
    (["--modes", "eager", "--cuda-graph"], "give --modes or --cuda-graph, not both"),
])
def test_bench_modes_are_checked(arguments, message, capsys):
    assert main(["bench", "--model", TINY_MODEL, *arguments]) == 2
    assert message in capsys.readouterr().err


def test_benchmark_modes_refuses_unknown_modes_and_graphs_on_a_cpu():
    from pitome.bench import benchmark_modes

    for modes, message in ((["eager", "warp"], "choose from eager, compile, cuda-graph"),
                           ([], "choose from"),
                           (["cuda-graph"], "the cuda-graph mode needs a CUDA device")):
        with pytest.raises(ValueError, match=message):
            benchmark_modes(torch.nn.Identity(), ["none"], 0.9, 1, torch.device("cpu"),
                            torch.float32, modes)

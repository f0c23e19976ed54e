"""Calibrated schedules: on a model whose best schedule is known, calibration must beat the
uniform ratio at the same FLOPs; budgets are respected; results round-trip through JSON."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, build, images
from timm.models.vision_transformer import VisionTransformer

import pitome
from pitome.analysis.flops import flops, schedule_macs
from pitome.calibration import Calibration, ScheduleSpace, calibrate, uniform_flops
from pitome.tasks.image_classification import kl_per_image


def late_blocks_idle(depth: int = 4, idle_from: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny ViT whose blocks from ``idle_from`` on add nothing to the residual stream: the
    class token leaving them is the one entering them, whatever was merged there. Merging in
    those blocks is free, merging before them is not (their contributions are amplified so
    that it shows); a uniform ratio merges everywhere."""
    torch.manual_seed(seed)
    model = VisionTransformer(**{**TINY, "depth": depth}).eval()
    with torch.no_grad():
        for block in model.blocks[:idle_from]:
            block.attn.qkv.weight.mul_(5)
            block.attn.proj.weight.mul_(10)
            block.mlp.fc2.weight.mul_(10)
        for block in model.blocks[idle_from:]:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
        model.head.weight.mul_(3 / model(images(32, seed=99)).std())  # logits' std about 3
    return model


def kl_of(model, algo: str, r, inputs) -> float:
    pitome.unpatch(model)
    with torch.no_grad():
        reference = model(inputs)
        pitome.patch(model, algo, r=list(r))
        merged = model(inputs)
    pitome.unpatch(model)
    return kl_per_image(merged, reference).mean().item()


@pytest.mark.parametrize("rates", ["probe", "gradient", "gradient-then-probe"])
@pytest.mark.parametrize("algo", ["pitome", "tome"])
def test_calibration_beats_uniform_where_late_blocks_are_free(algo, rates):
    model = late_blocks_idle()
    budget = uniform_flops(model, 0.9, algo)
    result = calibrate(model, images(32, seed=1), algo, budget, batch_size=8,
                       max_evaluations=60, rates=rates)
    assert pitome.merge_config(model) is None  # left unmerged
    assert result.rates == rates
    assert result.flops <= budget
    assert schedule_macs(model, result.r) <= budget * schedule_macs(model, [0] * 4)
    uniform = result.shapes["uniform"]["r"]
    assert sum(result.r[:2]) < sum(uniform[:2])  # merges moved off the blocks that matter
    # ... and it holds on inputs the calibration never saw.
    fresh = images(32, seed=7)
    assert kl_of(model, algo, result.r, fresh) < 0.5 * kl_of(model, algo, uniform, fresh)
    assert result.loss <= min(shape["loss"] for shape in result.shapes.values())


def test_schedule_macs_match_the_counted_forward():
    model = build("vit")
    x = images(1)
    for algo in ("pitome", "tome"):
        r = [9, 3, 0, 5]
        pitome.patch(model, algo, r=r)
        algorithm = pitome.merge_config(model).algorithm
        assert schedule_macs(model, r, algorithm) == flops(model, x).total_macs
    pitome.unpatch(model)
    assert schedule_macs(model, [0, 0, 0, 0]) == flops(model, x).total_macs


def test_shapes_fill_the_budget_and_uniform_is_the_ratio_schedule():
    model = build("vit")
    space = ScheduleSpace.of(model, "pitome", {})
    pitome.patch(model, "pitome", ratio=0.9)
    with torch.no_grad():
        model(images(1))
    expected = pitome.merge_info(model).merges
    pitome.unpatch(model)
    budget = space.cost(space.uniform(0.9))
    assert space.shape("uniform", budget) == expected
    for name in ("constant", "early-heavy", "late-heavy"):
        r = space.shape(name, budget)
        assert space.fits(r) and space.cost(r) <= budget


def test_full_budget_merges_nothing():
    model = build("vit")
    result = calibrate(model, images(4), "tome", 1.0, max_evaluations=5)
    assert result.r == [0, 0, 0, 0] and result.flops == 1.0 and result.loss == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("flops_value", [0.0, 0.05, 1.5, float("nan"), "half"])
def test_budget_out_of_range_is_refused(flops_value):
    with pytest.raises(ValueError, match="flops="):
        calibrate(build("vit"), images(4), "pitome", flops_value)


def test_bad_arguments_are_refused():
    model = build("vit")
    with pytest.raises(ValueError, match="objective"):
        calibrate(model, images(4), objective="mse")
    with pytest.raises(ValueError, match="holdout"):
        calibrate(model, images(4), holdout=1.0)
    with pytest.raises(ValueError, match="rates must be one of probe, gradient, "
                                         "gradient-then-probe, got 'adjoint'"):
        calibrate(model, images(4), rates="adjoint")
    with pytest.raises(ValueError, match="batches holds no inputs"):
        calibrate(model, [])
    with pytest.raises(TypeError, match="each batch"):
        calibrate(model, ["an image"])
    with pytest.raises(TypeError, match="counts FLOPs"):
        calibrate(torch.nn.Linear(4, 4), torch.randn(2, 4))
    pitome.patch(model, "tome")
    with pytest.raises(ValueError, match="unpatch"):
        calibrate(model, images(4))


@pytest.mark.parametrize("rates", ["probe", "gradient"])
def test_headless_encoder_is_calibrated_on_pooled_features(rates):
    torch.manual_seed(0)
    model = VisionTransformer(**{**TINY, "num_classes": 0}).eval()
    result = calibrate(model, images(8), "pitome", 0.8, batch_size=4, max_evaluations=20,
                       rates=rates)
    assert result.objective == "cosine" and result.flops <= 0.8
    assert 0 <= result.loss <= min(shape["loss"] for shape in result.shapes.values())


def test_gradient_rates_rank_blocks_as_probes_do_where_merging_is_free():
    """On the model whose last two blocks add nothing, one merge more costs nothing in
    blocks 1-3 (a merge changes only what later blocks' attention sees, and the class token
    passes blocks 2 and 3 unchanged) and something in block 0: the derivatives say so, and
    a probe agrees."""
    from pitome.calibration import Objective

    model = late_blocks_idle()
    objective = Objective(model, list(images(16, seed=1).split(8)), "kl")
    pitome.patch(model, "tome", r=[4, 4, 4, 4])
    derivatives = objective.merge_derivatives([0, 1, 2, 3])
    change = {block: slope + curvature / 2 for block, (slope, curvature) in derivatives.items()}
    assert change[1] == change[2] == change[3] == 0
    assert change[0] > 0
    base = objective.losses().mean().item()
    for block, expected in ((0, True), (1, False)):
        pitome.unpatch(model)
        pitome.patch(model, "tome", r=[5 if b == block else 4 for b in range(4)])
        assert (objective.losses().mean().item() > base + 1e-6) == expected


def test_save_load_round_trip_and_apply(tmp_path):
    model = build("vit")
    result = calibrate(model, images(8), "tome", 0.8, batch_size=4, max_evaluations=10,
                       name="tiny")
    path = result.save(tmp_path / "c.json")
    loaded = Calibration.load(path)
    assert loaded == result
    assert "rates" not in json.loads(path.read_text())  # probe files read as before rates
    with pytest.raises(FileExistsError, match="overwrite"):
        result.save(path)
    result.save(path, overwrite=True)
    loaded.apply(model)
    with torch.no_grad():
        model(images(1))
    assert pitome.merge_info(model).merges == result.r
    assert pitome.merge_config(model).algo == "tome"


def test_load_refuses_other_json(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"r": [1, 2]}))
    with pytest.raises(ValueError, match="not a pitome calibration"):
        Calibration.load(path)
    path.write_text(json.dumps({"format": "pitome.calibration/1", "r": [1, -2], "algo": "x"}))
    with pytest.raises(ValueError, match="non-negative"):
        Calibration.load(path)


def test_calibrate_command_writes_the_json(tmp_path, capsys):
    from conftest import image_folder

    from pitome.cli import main

    folder = image_folder(tmp_path / "images", classes=2, per_class=4)
    out = tmp_path / "c.json"
    args = ["calibrate", "--data", str(folder), "--model", "vit_tiny_patch16_224",
            "--random-weights", "--algo", "tome", "--num-images", "4", "--batch", "2",
            "--max-evaluations", "12", "--rates", "gradient", "--out", str(out)]
    assert main(args) == 0
    result = Calibration.load(out)
    assert result.algo == "tome" and len(result.r) == 12 and result.flops <= result.budget
    assert result.rates == "gradient"
    assert result.examples == {"search": 2, "holdout": 2}
    assert "calibrated" in capsys.readouterr().out
    assert main(args) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_class_balanced_halves_span_every_class():
    from pathlib import Path

    from pitome.tasks.image_classification import (LabelledImage, class_balanced_halves,
                                                   evenly_spread)

    items = [LabelledImage(Path(f"{label}-{index}.png"), label)
             for label in (3, 0, 2, 1) for index in range(2)]
    first, second = class_balanced_halves(items)
    assert [item.label for item in first] == [item.label for item in second] == [0, 1, 2, 3]
    assert [item.label for item in evenly_spread(first + second, 2)] == [0, 0]
    assert [item.label for item in evenly_spread(first, 2)] == [0, 2]
    assert evenly_spread(first, 10) == first

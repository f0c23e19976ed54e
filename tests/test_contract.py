"""The adapter contract: every supported family, one table, the same checks.

A patched model must still behave as an ordinary module: ratio 1 is the identity, unpatch
is exact, patching twice replaces, the merge invariants hold, it compiles with fullgraph (and
``merge_info`` is then right), it deep-copies into an independent model, it pickles whole,
concurrent forwards from several threads give the serial outputs, and gradient
checkpointing gives the gradients of the plain backward. A new family costs one row.
"""

from __future__ import annotations

import copy
import io
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import pitome

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

from conftest import VARIANTS, build as build_timm, images as timm_images  # noqa: E402
from test_hf_adapters import (TEXT_MODELS, VISION_MODELS, build as build_hf,  # noqa: E402
                              images as hf_images, sentences, text_output, vision_output)
from test_open_clip import images as clip_images, tower  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One model family: how to build it, feed it a batch and read its output."""

    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int], dict]
    output: Callable[[torch.nn.Module, dict], torch.Tensor]
    tokens: int  # tokens entering the first block, per (unpadded) example
    num_prefix: int
    text: bool = False
    checkpointing: Callable[[torch.nn.Module], None] | None = None
    thread_safe: bool = True  # False where the unpatched model is not thread-safe either


def _timm_row(variant: str) -> Row:
    model = VARIANTS[variant]()
    return Row(lambda: build_timm(variant), lambda b: {"x": timm_images(b)},
               lambda m, kw: m(kw["x"]), 64 + model.num_prefix_tokens, model.num_prefix_tokens,
               checkpointing=lambda m: m.set_grad_checkpointing(True))


def _hf_vision_row(name: str) -> Row:
    # transformers' BLIP text encoder (which cross-attends to the image tokens) fails under
    # concurrent forwards unpatched too: mismatched batch sizes inside its cross-attention.
    return Row(lambda: build_hf(name, VISION_MODELS), lambda b: {"x": hf_images(b)},
               lambda m, kw: vision_output(name, m, kw["x"]), 65 + VISION_MODELS[name][1] - 1,
               VISION_MODELS[name][1],
               checkpointing=lambda m: m.gradient_checkpointing_enable(),
               thread_safe=name != "BlipForImageTextRetrieval")


def _hf_text_row(name: str) -> Row:
    def inputs(batch: int) -> dict:
        ids, mask = sentences(batch)
        return {"ids": ids, "mask": mask}

    return Row(lambda: build_hf(name, TEXT_MODELS), inputs,
               lambda m, kw: text_output(name, m, kw["ids"], kw["mask"]), 24, 1, text=True,
               checkpointing=lambda m: m.gradient_checkpointing_enable())


def _open_clip_row(pool: str) -> Row:
    return Row(lambda: tower(pool), lambda b: {"x": clip_images(b)}, lambda m, kw: m(kw["x"]),
               65, 1, checkpointing=lambda m: m.set_grad_checkpointing(True))


TABLE: dict[str, Row] = {
    **{f"timm-{variant}": _timm_row(variant) for variant in VARIANTS},
    **{f"hf-{name}": _hf_vision_row(name) for name in VISION_MODELS},
    **{f"hf-{name}": _hf_text_row(name) for name in TEXT_MODELS},
    "open_clip-tok": _open_clip_row("tok"),
    "open_clip-avg": _open_clip_row("avg"),
}
ROWS = sorted(TABLE)


def _run(row: Row, model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return row.output(model, batch)


@pytest.mark.parametrize("name", ROWS)
def test_identity_unpatch_and_double_patch(name):
    row = TABLE[name]
    model, batch = row.build(), row.inputs(3)
    reference = _run(row, model, batch)
    pitome.patch(model, ratio=1.0)
    assert torch.equal(_run(row, model, batch), reference)
    pitome.patch(model, algo="tome", ratio=0.8)
    merged_once = _run(row, model, batch)
    assert not torch.allclose(merged_once, reference)
    pitome.patch(model, algo="pitome", ratio=0.7)
    pitome.patch(model, algo="tome", ratio=0.8)  # patching again replaces, never stacks
    assert torch.equal(_run(row, model, batch), merged_once)
    pitome.unpatch(model)
    assert torch.equal(_run(row, model, batch), reference)
    assert not any("Merging" in type(module).__name__ for module in model.modules())
    assert pitome.merge_info(model) is None


@pytest.mark.parametrize("name", ROWS)
def test_invariants(name):
    row = TABLE[name]
    model, batch = row.build(), row.inputs(3)
    pitome.patch(model, algo="tome", ratio=0.8, trace_source=not row.text)
    _run(row, model, batch)
    info = pitome.merge_info(model)
    assert info.token_counts[0] == row.tokens
    assert info.token_counts[-1] < row.tokens
    real = batch["mask"].sum(dim=1).float() if row.text else torch.full((3,), float(row.tokens))
    sizes = info.sizes[..., 0]
    if info.padding is not None:
        sizes = sizes * info.padding
    assert torch.equal(sizes.sum(dim=1), real)
    assert sizes.shape[1] == info.token_counts[-1]
    if row.text:  # padding never merges with real tokens, and stays last
        kept = info.padding.sum(dim=1)
        assert torch.equal(info.padding, torch.arange(info.padding.shape[1]) < kept[:, None])
        return
    assert torch.equal(info.source.sum(dim=1), torch.ones(3, row.tokens))
    prefix = row.num_prefix
    assert torch.equal(info.source[:, :prefix], torch.eye(row.tokens)[:prefix].expand(3, -1, -1))


@pytest.mark.parametrize("name", ROWS)
def test_fullgraph_compile_and_merge_info(name):
    """Padded text compiles in one graph too: while compiling, each sentence's token counts
    are looked up on the device (pitome.runtime.padded), never read on the host."""
    row = TABLE[name]
    model, batch, other = row.build(), row.inputs(3), row.inputs(2)
    pitome.patch(model, algo="tome", ratio=0.8)
    eager = _run(row, model, batch)
    eager_sizes = pitome.merge_info(model).sizes
    torch._dynamo.reset()  # each row compiles afresh, within dynamo's recompile limit
    compiled = torch.compile(lambda kw: row.output(model, kw), fullgraph=True,
                             backend="eager")
    _run(row, model, other)  # merge_info now holds another batch's sizes
    with torch.no_grad():
        out = compiled(batch)
    torch.testing.assert_close(out, eager)
    assert torch.equal(pitome.merge_info(model).sizes, eager_sizes)


@pytest.mark.parametrize("name", ROWS)
def test_deepcopy_is_independent(name):
    row = TABLE[name]
    model, batch = row.build(), row.inputs(3)
    pitome.patch(model, algo="tome", ratio=0.8)
    reference = _run(row, model, batch)
    info = pitome.merge_info(model)
    twin = copy.deepcopy(model)
    assert pitome.merge_info(twin) is None
    assert torch.equal(_run(row, twin, row.inputs(3)), reference)
    _run(row, twin, row.inputs(2))
    assert pitome.merge_info(twin).sizes.shape[0] == 2
    assert pitome.merge_info(model) is info  # the copy's forwards are its own
    pitome.unpatch(twin)
    assert torch.equal(_run(row, model, batch), reference)  # the original is still merging
    assert pitome.merge_info(model).sizes.shape[0] == 3


@pytest.mark.parametrize("name", ROWS)
def test_torch_save_and_load_of_the_whole_model(name):
    row = TABLE[name]
    model, batch = row.build(), row.inputs(3)
    pitome.patch(model, algo="pitome", ratio=0.8)
    reference = _run(row, model, batch)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert torch.equal(_run(row, loaded, batch), reference)
    assert pitome.merge_info(loaded).token_counts == pitome.merge_info(model).token_counts
    pitome.unpatch(loaded)
    assert pitome.merge_info(loaded) is None
    assert not torch.allclose(_run(row, loaded, batch), reference)


@pytest.mark.parametrize("name", ROWS)
def test_concurrent_forwards_give_the_serial_outputs(name):
    row = TABLE[name]
    if not row.thread_safe:
        pytest.skip("the unpatched model is not thread-safe either")
    model = row.build()
    pitome.patch(model, algo="pitome", ratio=0.8)
    batches = [row.inputs(size) for size in (1, 2, 3, 4)]
    serial = [_run(row, model, batch) for batch in batches]
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(batches))

    def work(index: int) -> None:
        try:
            start.wait()
            results[index] = [_run(row, model, batches[index]) for _ in range(4)]
            results[index].append(pitome.merge_info(model).sizes.shape[0])
        except BaseException as error:  # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, outputs in results.items():
        assert outputs.pop() == index + 1  # each thread's merge_info is its own last forward
        for out in outputs:
            torch.testing.assert_close(out, serial[index], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ROWS)
def test_gradient_checkpointing_gives_the_plain_gradients(name):
    row = TABLE[name]
    batch = row.inputs(2)

    def gradients(checkpointed: bool) -> dict[str, torch.Tensor]:
        model = row.build()
        for module in model.modules():  # dropout off: both runs must see the same network
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if hasattr(model, "config"):
            for key in ("attention_probs_dropout_prob", "attention_dropout", "dropout"):
                if isinstance(getattr(model.config, key, None), float):
                    setattr(model.config, key, 0.0)
        if checkpointed:
            row.checkpointing(model)
        pitome.patch(model, algo="tome", ratio=0.8)
        model.train()
        out = row.output(model, batch)
        out.float().square().mean().backward()
        assert pitome.merge_info(model).token_counts[-1] < row.tokens
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain and plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-6)


def test_patching_an_outer_model_replaces_the_inner_patch():
    model = build_hf("CLIPModel", VISION_MODELS)
    x = hf_images(2)
    pitome.patch(model.vision_model, algo="tome", ratio=0.8)
    pitome.patch(model, algo="pitome", ratio=0.9)
    assert pitome.merge_info(model.vision_model) is None
    with torch.no_grad():
        model.get_image_features(pixel_values=x)
    assert pitome.merge_info(model).algo == "pitome"
    pitome.unpatch(model)
    assert not any("Merging" in type(module).__name__ for module in model.modules())


def test_patching_part_of_a_patched_model_is_refused_and_changes_nothing():
    model = build_hf("CLIPModel", VISION_MODELS)
    x = hf_images(2)
    pitome.patch(model, algo="tome", ratio=0.8)
    with torch.no_grad():
        before = model.get_image_features(pixel_values=x).pooler_output
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    with pytest.raises(ValueError, match="part of a model that pitome.patch merged"):
        pitome.patch(model.vision_model, algo="pitome", ratio=0.9)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    with torch.no_grad():
        assert torch.equal(model.get_image_features(pixel_values=x).pooler_output, before)
    pitome.unpatch(model)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_a_layer_called_outside_its_model_says_so():
    model = build_hf("BertModel", TEXT_MODELS)
    pitome.patch(model, ratio=0.8)
    with pytest.raises(RuntimeError, match="outside its model's forward"):
        model.encoder.layer[1](torch.randn(1, 5, 64))


@pytest.mark.parametrize("name", ["hf-BertModel", "hf-CLIPVisionModel", "open_clip-tok",
                                  "timm-vit"])
def test_a_forward_that_raises_leaves_no_session_behind(name):
    from pitome.runtime.patcher import patch_of

    row = TABLE[name]
    model, batch = row.build(), row.inputs(3)
    pitome.patch(model, algo="tome", ratio=0.8)
    reference = _run(row, model, batch)
    info = pitome.merge_info(model)
    failing = [m for m in model.modules() if type(m).__name__.startswith("Merging")
               and "Layer" in type(m).__name__ or "Block" in type(m).__name__][1]

    def fail(module, args, out):
        raise RuntimeError("injected")

    handle = failing.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="injected"):
        _run(row, model, row.inputs(2))
    handle.remove()
    assert patch_of(model).runtime.current() is None
    assert pitome.merge_info(model) is info  # a failed forward records nothing
    assert torch.equal(_run(row, model, batch), reference)

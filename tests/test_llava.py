"""LLaVA-1.5 end to end on a tiny random model and its processor: the processor's output goes
into a patched model unchanged (forward and generate), with static KV caches, for every
algorithm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pitome

transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")
if hasattr(transformers.LlavaForConditionalGeneration, "_merge_input_ids_with_image_features"):
    pytest.skip("transformers < 4.48 expands image placeholders itself; pitome refuses",
                allow_module_level=True)

from pitome.llava import fit_image_placeholders, image_tokens, unmerged_image_tokens  # noqa: E402

WORDS = ["[PAD]", "[UNK]", "<image>", "USER:", "ASSISTANT:", "what", "is", "it", "the", "sky",
         "a", "dog", "cat", "and", "?"]
VISION = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
              image_size=64, patch_size=8)
GREEDY = dict(max_new_tokens=5, do_sample=False)
PROMPTS = ["USER: <image> what is it ? ASSISTANT:",
           "USER: <image> <image> the sky and a dog is what it is ? ASSISTANT:"]


def processor():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                                     pad_token="[PAD]")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.padding_side = "left"  # as LLaVA pads for generation
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 64},
                                             crop_size={"height": 64, "width": 64})
    return transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                                       vision_feature_select_strategy="default",
                                       image_token="<image>", num_additional_image_tokens=1)


def tiny_llava(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION),
        text_config=transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=64,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=4, intermediate_size=128,
                                             pad_token_id=0, max_position_embeddings=512),
        image_token_id=WORDS.index("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    return transformers.LlavaForConditionalGeneration(config).eval()


def pictures(count: int):
    from PIL import Image

    generator = torch.Generator().manual_seed(5)
    return [Image.fromarray((torch.rand(70, 80, 3, generator=generator) * 255).to(torch.uint8)
                            .numpy()) for _ in range(count)]


@pytest.fixture(scope="module")
def inputs():
    """Two prompts of different lengths, left-padded; the second holds two images."""
    return dict(processor()(images=pictures(3), text=PROMPTS, padding=True, return_tensors="pt"))


def new_tokens(output: torch.Tensor, prompt: dict) -> torch.Tensor:
    return output[:, prompt["input_ids"].shape[1]:]


def test_processor_output_goes_in_unchanged(inputs):
    model = pitome.patch(tiny_llava(), "pitome", ratio=0.8)
    assert unmerged_image_tokens(model) == 64 and image_tokens(model) == 34
    fitted = fit_image_placeholders(model, inputs)
    assert (fitted["input_ids"] == 2).sum(dim=1).tolist() == [34, 68]
    assert fitted["attention_mask"][0, 0] == 0 and fitted["attention_mask"][:, -1].all()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, model(**fitted).logits)
        by_position = model(inputs["input_ids"], inputs["pixel_values"],
                            inputs["attention_mask"]).logits
    torch.testing.assert_close(by_position, model(**fitted).logits)
    given = model.generate(**inputs, **GREEDY)
    by_hand = model.generate(**fitted, **GREEDY)
    # The output starts with the prompt as given, so the new tokens are where they always are.
    assert torch.equal(given[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert torch.equal(new_tokens(given, inputs), new_tokens(by_hand, fitted))
    assert new_tokens(given, inputs).shape == (2, 5)


def test_fitting_is_idempotent_and_cuts_labels_and_positions(inputs):
    model = pitome.patch(tiny_llava(), "tome", ratio=0.8)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == 2, -100)
    fitted = fit_image_placeholders(model, {**inputs, "labels": labels})
    again = fit_image_placeholders(model, fitted)
    assert all(again[key] is fitted[key] for key in fitted)
    kept = fitted["attention_mask"].bool()
    assert torch.equal(fitted["labels"][kept], fitted["input_ids"].masked_fill(
        fitted["input_ids"] == 2, -100)[kept])
    assert (fitted["labels"][~kept] == -100).all()
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        loss = model(**inputs, labels=labels, position_ids=positions).loss
        by_hand = model(**fitted, position_ids=(kept.long().cumsum(-1) - 1).masked_fill(~kept, 1)
                        ).loss
    torch.testing.assert_close(loss, by_hand)
    with pytest.raises(ValueError, match="64 per image"):
        fit_image_placeholders(model, {**inputs, "pixel_values": inputs["pixel_values"][:2]})


def test_a_prefill_with_a_prepared_attention_mask_passes_fitted_and_refuses_unfitted(inputs):
    """Some transformers versions hand the prefill of a static-cache generation a 4-D mask
    as wide as the cache: a fitted prompt passes through, an unfitted one is refused."""
    model = pitome.patch(tiny_llava(), "tome", ratio=0.8)
    fitted = fit_image_placeholders(model, inputs)
    batch, width = fitted["input_ids"].shape
    prepared = torch.zeros(batch, 1, width, width + 5)
    again = fit_image_placeholders(model, {**fitted, "attention_mask": prepared})
    assert again["input_ids"] is fitted["input_ids"] and again["attention_mask"] is prepared
    with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 1, "):
        fit_image_placeholders(model, {**inputs, "attention_mask": torch.zeros(
            batch, 1, inputs["input_ids"].shape[1], inputs["input_ids"].shape[1] + 5)})


def test_ratio_one_equals_unpatched_and_unpatch_restores(inputs):
    model = tiny_llava()

    def last_logits():
        with torch.no_grad():
            return model(**inputs).logits[:, -1]

    reference, reference_logits = model.generate(**inputs, **GREEDY), last_logits()
    pitome.patch(model, "pitome", ratio=1.0)
    assert torch.equal(model.generate(**inputs, **GREEDY), reference)
    torch.testing.assert_close(last_logits(), reference_logits)
    pitome.patch(model, "pitome", ratio=0.8)
    assert not torch.allclose(last_logits(), reference_logits)
    pitome.unpatch(model)
    assert "generate" not in model.__dict__ and not model._forward_pre_hooks
    assert torch.equal(model.generate(**inputs, **GREEDY), reference)
    torch.testing.assert_close(last_logits(), reference_logits)


def test_static_cache_gives_the_ids_of_the_dynamic_cache(inputs):
    model = pitome.patch(tiny_llava(), "pitome", ratio=0.8)
    dynamic = model.generate(**inputs, **GREEDY)
    static = model.generate(**inputs, **GREEDY, cache_implementation="static")
    assert torch.equal(static, dynamic)


def test_llava_next_is_refused_with_the_reason():
    class LlavaNextForConditionalGeneration(nn.Module):
        pass

    with pytest.raises(pitome.UnsupportedModelError, match="anyres tiles"):
        pitome.patch(LlavaNextForConditionalGeneration())


@pytest.mark.parametrize("algo", sorted(pitome.available_algorithms()))
def test_every_algorithm_serves_a_token_count_with_a_static_cache(algo, inputs):
    model = pitome.patch(tiny_llava(), algo, tokens=12)
    assert image_tokens(model) == 12
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]),
        with_kwargs=True)
    try:
        torch.manual_seed(0)  # the "random" floor draws its partners
        dynamic = model.generate(**inputs, **GREEDY)
    finally:
        hook.remove()
    fitted = fit_image_placeholders(model, inputs)
    assert seen[0] == fitted["input_ids"].shape[1]
    assert (fitted["input_ids"] == 2).sum(dim=1).tolist() == [12, 24]
    torch.manual_seed(0)
    static = model.generate(**inputs, **GREEDY, cache_implementation="static")
    assert torch.equal(static, dynamic)


def test_an_unreachable_image_token_count_is_refused_at_patch_time():
    with pytest.raises(ValueError, match="tokens >= 8"):  # 64 -> 32 -> 16 -> 8 in 3 blocks
        pitome.patch(tiny_llava(), "tome", tokens=7)
    model = pitome.patch(tiny_llava(), "visionzip", tokens=7)  # one shot: any count
    assert image_tokens(model) == 7


def test_vqa_generates_with_a_static_cache_on_gpus_and_the_decoder_when_compiled(inputs):
    from pitome.generation import GreedyDecoder
    from pitome.tasks.runner import Processes
    from pitome.tasks.vqa import VQAEvaluation

    model = pitome.patch(tiny_llava(), "pitome", ratio=0.8)
    tasks, captured = {}, {}
    for device, compiled in (("cpu", False), ("cuda", False), ("cuda", True)):
        task = VQAEvaluation(model, processor(), [], Processes(device=torch.device(device)),
                             max_new_tokens=5, compiled=compiled)
        tasks[device, compiled] = task
        captured[device] = task.capture_tower
    assert captured == {"cpu": False, "cuda": True}  # the tower is replayed on GPUs only
    assert not VQAEvaluation(model, processor(), [], Processes(device=torch.device("cuda")),
                             capture_tower=False).capture_tower
    assert "cache_implementation" not in tasks["cpu", False].generation_options()
    assert tasks["cuda", False].generation_options()["cache_implementation"] == "static"
    assert tasks["cpu", False].decoder is None and tasks["cuda", False].decoder is None
    decoder = tasks["cuda", True].decoder
    assert isinstance(decoder, GreedyDecoder) and decoder.cache_multiple == 64
    # What each GPU path generates gives the CPU path's answers here.
    expected = model.generate(**inputs, **tasks["cpu", False].generation_options())
    assert torch.equal(model.generate(**inputs, **tasks["cuda", False].generation_options()),
                       expected)
    assert torch.equal(decoder.generate(5, **inputs), expected)


def test_a_merged_static_cache_is_sized_to_the_merged_prompt(inputs):
    from pitome.llava import forget_static_cache

    def cache_length(output) -> int:
        cache = getattr(output, "past_key_values", None) or getattr(output, "cache", None)
        return cache.layers[0].keys.shape[2]

    options = dict(GREEDY, cache_implementation="static", return_dict_in_generate=True)
    model = tiny_llava()
    unmerged = cache_length(model.generate(**inputs, **options))
    pitome.patch(model, "pitome", ratio=0.8)
    merged = cache_length(model.generate(**inputs, **options))
    fitted = fit_image_placeholders(model, inputs)["input_ids"].shape[1]
    # The cache holds the prompt and every new token but the last.
    assert merged == fitted + GREEDY["max_new_tokens"] - 1 < unmerged
    pitome.unpatch(model)
    forget_static_cache(model)
    assert cache_length(model.generate(**inputs, **options)) == unmerged


def _llava_benchmark():
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "llava.py"
    spec = importlib.util.spec_from_file_location("llava_benchmark", script)
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = benchmark  # dataclasses look their module up
    spec.loader.exec_module(benchmark)
    return benchmark


def test_the_llava_benchmark_gives_each_variant_its_own_static_cache_back():
    from pitome.adapters.llava import STATIC_CACHE_MEMORY

    benchmark = _llava_benchmark()
    model = benchmark.build_model(True, torch.device("cpu"), torch.float32)
    inputs = benchmark.prompts(model, 1, 6, torch.device("cpu"), torch.float32)
    merged, unmerged = (benchmark.Variant.parse(name) for name in ("pitome@0.9", "none"))
    caches = benchmark.StaticCaches()

    def generate_as(variant):
        variant.apply(model, caches)
        benchmark.generate_once(model, inputs, "static", 2, torch.device("cpu"))
        return {name: model.__dict__[name] for name in STATIC_CACHE_MEMORY
                if name in model.__dict__}

    first = generate_as(merged)
    assert first, "transformers kept nothing of the static cache on the model"
    assert generate_as(unmerged) != first  # the unmerged prompt is longer
    merged.apply(model, caches)
    assert all(model.__dict__[name] is kept for name, kept in first.items())
    assert [v.name for v in benchmark.rotated([merged, unmerged], 1)] == ["none", "pitome@0.9"]


def test_the_llava_benchmark_runs_tiny_and_never_overwrites(tmp_path, capsys):
    import json

    benchmark = _llava_benchmark()
    out = tmp_path / "bench.json"
    args = ["--tiny", "--variants", "none,pitome@0.9,visionzip@64t", "--batches", "1",
            "--modes", "eager,static,decoder", "--warmup", "0", "--new-tokens", "3",
            "--json", str(out)]
    assert benchmark.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(row["mode"], row["variant"]) for row in rows} == {
        (mode, variant) for mode in ("eager", "static", "decoder")
        for variant in ("none", "pitome@0.9", "visionzip@64t")}
    tokens = {row["variant"]: row["image_tokens"] for row in rows}
    assert tokens == {"none": 256, "pitome@0.9": 188, "visionzip@64t": 64}
    for row in rows:
        assert row["ttft_ms"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["image_kv_mb"] <= row["kv_cache_mb"]
    assert "| eager | 1 | visionzip@64t | 64 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists"):
        benchmark.main(args)


@pytest.mark.parametrize("decoding", ["generate", "compile"])
def test_eval_vqa_takes_token_counts_beside_ratios(tmp_path, capsys, decoding):
    """With --compile a GPU decodes with pitome.generation.GreedyDecoder (on CPU as without)."""
    import json

    from pitome.cli import main

    tiny_llava().save_pretrained(tmp_path / "llava")
    processor().save_pretrained(tmp_path / "llava")
    for index, picture in enumerate(pictures(2)):
        picture.save(tmp_path / f"p{index}.png")
    lines = [{"image": "p0.png", "question": "what is it ?", "answer": "dog"},
             {"image": "p1.png", "question": "what is the sky ?", "answer": "A",
              "choices": ["dog", "cat"]}]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    assert main(["eval", "vqa", "--model", str(tmp_path / "llava"), "--data",
                 str(tmp_path / "q.jsonl"), "--algo", "none,visionzip,pitome", "--ratio", "0.8",
                 "--tokens", "12", "--batch-size", "2", "--max-new-tokens", "2", "--no-plot",
                 "--out", str(tmp_path / "out")] + ["--compile"] * (decoding == "compile")) == 0
    cells = json.loads((tmp_path / "out" / "results.json").read_text())["cells"]
    assert {key: cell["image_tokens"] for key, cell in cells.items()} == {
        "none": 64, "visionzip@0.8": 34, "pitome@0.8": 34, "visionzip@12t": 12,
        "pitome@12t": 12}
    assert cells["visionzip@12t"]["tokens"] == 12 and cells["visionzip@12t"]["ratio"] is None
    assert cells["visionzip@12t"]["gflops"] < cells["visionzip@0.8"]["gflops"]
    out = capsys.readouterr().out
    assert " 12t " in out
    assert (tmp_path / "out" / "results.csv").read_text().startswith("algo,ratio,tokens,")


def test_the_compiled_decoding_step_traces_whole_through_the_patch(inputs):
    """transformers compiles the decoding step (``torch.compile`` of the model's call, with
    its hooks) for a static cache on GPUs; here on CPU, Dynamo only (backend "eager"),
    fullgraph so that a graph break in the placeholder hook would fail."""
    model = pitome.patch(tiny_llava(), "visionzip", tokens=12)
    reference = model.generate(**inputs, **GREEDY)
    config = transformers.CompileConfig(backend="eager", fullgraph=True, mode=None)
    config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    compiled = model.generate(**inputs, **GREEDY, cache_implementation="static",
                              compile_config=config)
    assert hasattr(model, "_compiled_call") and torch.equal(compiled, reference)


# ----------------------------------------------------------------------------- captured tower
def test_a_captured_tower_runs_eagerly_off_the_gpu_and_copies_without_graphs(inputs):
    import copy

    from pitome.cuda_graph import ShapeGraphs
    from pitome.llava import capture_vision_tower, release_vision_tower

    model = pitome.patch(tiny_llava(), "pitome", ratio=0.8)
    with torch.no_grad():
        expected = model.generate(**inputs, **GREEDY)
    tower = model.model.vision_tower
    capture_vision_tower(model)
    assert isinstance(tower.__dict__["forward"], ShapeGraphs)
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, **GREEDY), expected)
    assert not tower.forward.graphs  # a CPU call runs eagerly, nothing is captured
    twin = copy.deepcopy(model)
    twin_tower = twin.model.vision_tower
    assert isinstance(twin_tower.__dict__["forward"], ShapeGraphs)
    assert twin_tower.forward.forward.__self__ is twin_tower  # the copy's own forward
    with torch.no_grad():
        assert torch.equal(twin.generate(**inputs, **GREEDY), expected)
    release_vision_tower(model)
    assert "forward" not in tower.__dict__
    with pytest.raises(ValueError, match="max_graphs must be at least 1, got 0"):
        capture_vision_tower(model, max_graphs=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("patch", [dict(algo="pitome", ratio=0.8),
                                   dict(algo="visionzip", tokens=12)], ids=["pitome", "visionzip"])
def test_a_captured_merged_tower_replays_what_it_computes_eagerly(inputs, dtype, patch):
    from pitome.llava import capture_vision_tower, release_vision_tower

    model = pitome.patch(tiny_llava().to("cuda", dtype), **patch)
    prompt = {name: value.to("cuda") for name, value in inputs.items()}
    prompt["pixel_values"] = prompt["pixel_values"].to(dtype)
    with torch.no_grad():
        expected = model.generate(**prompt, **GREEDY)
        eager = model.model.vision_tower(prompt["pixel_values"], output_hidden_states=True)
        eager = [state.clone() for state in eager.hidden_states]
    capture_vision_tower(model)
    graphs = model.model.vision_tower.forward.graphs
    with torch.no_grad():
        for _ in range(2):  # captured, then replayed
            replayed = model.model.vision_tower(prompt["pixel_values"],
                                                output_hidden_states=True)
            for got, want in zip(replayed.hidden_states, eager):
                torch.testing.assert_close(got, want)
        assert len(graphs) == 1
        assert torch.equal(model.generate(**prompt, **GREEDY), expected)
        pitome.patch(model, "tome", ratio=0.8)  # another merge: captured anew
        model.generate(**prompt, **GREEDY)
        assert len(graphs) >= 2
    release_vision_tower(model)

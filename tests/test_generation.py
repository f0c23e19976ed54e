"""pitome.generation.GreedyDecoder: greedy decoding with a static cache and no host sync per
token gives exactly ``generate``'s tokens, patched or not, stopping as ``generate`` stops."""

from __future__ import annotations

import pytest
import torch

import pitome

transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")

from pitome.generation import GreedyDecoder, greedy_generate  # noqa: E402
from test_llava import PROMPTS, pictures, processor, tiny_llava  # noqa: E402

PATCHES = {"none": None, "pitome@0.8": ("pitome", dict(ratio=0.8)),
           "tome@0.8": ("tome", dict(ratio=0.8)), "visionzip@12t": ("visionzip", dict(tokens=12))}


def talkative(variant: str = "none", seed: int = 2) -> torch.nn.Module:
    """A tiny LLaVA whose greedy tokens change from step to step (a random one repeats one
    token)."""
    model = tiny_llava(seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    if PATCHES[variant] is not None:
        algo, options = PATCHES[variant]
        model = pitome.patch(model, algo, **options)
    return model


@pytest.fixture(scope="module")
def inputs():
    return dict(processor()(images=pictures(3), text=PROMPTS, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("variant", list(PATCHES))
def test_the_decoder_gives_generates_tokens(variant, inputs):
    model = talkative(variant)
    reference = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    new = reference[:, inputs["input_ids"].shape[1]:]
    assert len(set(new.flatten().tolist())) > 2
    assert torch.equal(GreedyDecoder(model).generate(10, **inputs), reference)


@pytest.mark.parametrize("check_every", [1, 4, 16])
def test_decoding_stops_where_generate_stops(check_every, inputs):
    model = talkative("pitome@0.8")
    free = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    new = free[:, inputs["input_ids"].shape[1]:]
    model.generation_config.eos_token_id = [int(new[0, 2]), int(new[1, 1])]
    reference = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert inputs["input_ids"].shape[1] < reference.shape[1] < free.shape[1]
    decoder = GreedyDecoder(model, check_every=check_every)
    assert torch.equal(decoder.generate(10, **inputs), reference)
    ignoring = decoder.generate(10, ignore_eos=True, **inputs)
    assert torch.equal(ignoring, free)


def test_a_compiled_step_traces_whole_and_the_cache_is_kept_per_shape(inputs):
    """On CPU with Dynamo only (backend "eager"), fullgraph, so a graph break fails."""
    model = talkative("pitome@0.8")
    reference = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    decoder = GreedyDecoder(model, compile={"backend": "eager", "mode": None})
    assert torch.equal(decoder.generate(6, **inputs), reference)
    kept = decoder._cache
    assert torch.equal(decoder.generate(6, **inputs), reference) and decoder._cache is kept
    one = {name: value[:1] for name, value in inputs.items() if name != "pixel_values"}
    one["pixel_values"] = inputs["pixel_values"][:1]
    alone = model.generate(**one, max_new_tokens=6, do_sample=False)
    assert torch.equal(decoder.generate(6, **one), alone) and decoder._cache is not kept


def test_a_rounded_cache_serves_shorter_prompts_with_the_same_tokens(inputs):
    model = talkative("pitome@0.8")
    decoder = GreedyDecoder(model, cache_multiple=64)
    long = decoder.generate(6, **inputs)
    assert torch.equal(long, model.generate(**inputs, max_new_tokens=6, do_sample=False))
    assert decoder._cache_shape[1] % 64 == 0
    kept = decoder._cache
    shorter = dict(processor()(images=pictures(2), text=[PROMPTS[0]] * 2, padding=True,
                               return_tensors="pt"))
    assert shorter["input_ids"].shape[1] < inputs["input_ids"].shape[1]
    assert torch.equal(decoder.generate(6, **shorter),
                       model.generate(**shorter, max_new_tokens=6, do_sample=False))
    assert decoder._cache is kept


def test_greedy_generate_keeps_one_decoder_and_a_copy_gets_a_fresh_one(inputs):
    import copy
    import pickle

    model = talkative("tome@0.8")
    first = greedy_generate(model, 4, **inputs)
    decoder = model._pitome_decoder
    assert torch.equal(greedy_generate(model, 4, **inputs), first)
    assert model._pitome_decoder is decoder and decoder._cache is not None
    twin = copy.deepcopy(model)
    fresh = twin._pitome_decoder
    assert fresh is not decoder and fresh.model is twin and fresh._cache is None
    assert torch.equal(greedy_generate(twin, 4, **inputs), first)
    thawed = pickle.loads(pickle.dumps(GreedyDecoder(talkative(), check_every=3)))
    assert thawed.check_every == 3 and thawed._cache is None


def test_bad_arguments_are_refused_by_name(inputs):
    model = talkative()
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got 0"):
        GreedyDecoder(model).generate(0, **inputs)
    with pytest.raises(ValueError, match="check_every must be a positive int, got 0"):
        GreedyDecoder(model, check_every=0)
    with pytest.raises(ValueError, match="cache_multiple must be a positive int, got 2.0"):
        GreedyDecoder(model, cache_multiple=2.0)
    with pytest.raises(TypeError, match="not a transformers generation model"):
        GreedyDecoder(torch.nn.Linear(2, 2))
    prepared = dict(inputs, attention_mask=inputs["attention_mask"][:, None, None, :])
    with pytest.raises(ValueError, match="attention_mask must be per token"):
        GreedyDecoder(model).generate(3, **prepared)
    with pytest.raises(ValueError, match="input_ids must be a B×T tensor"):
        GreedyDecoder(model).generate(3, input_ids=inputs["input_ids"][0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["none", "pitome@0.8", "visionzip@12t"])
def test_on_a_gpu_the_step_replays_as_cuda_graphs_with_generates_tokens(variant, inputs):
    model = talkative(variant).to("cuda")
    prompt = {name: value.to("cuda") for name, value in inputs.items()}
    reference = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    decoder = GreedyDecoder(model)
    for _ in range(2):  # the second call replays the graphs recorded by the first
        assert torch.equal(decoder.generate(8, **prompt), reference)
    assert decoder._graphs

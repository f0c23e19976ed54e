"""Hugging Face adapters on tiny random models built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch

import pitome

transformers = pytest.importorskip("transformers")

VISION = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
              image_size=64, patch_size=8)
TEXT = dict(vocab_size=120, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64)


def _vit(cls):
    return cls(transformers.ViTConfig(**VISION, num_labels=7))


def _deit(cls):
    return cls(transformers.DeiTConfig(**VISION, num_labels=7))


def _clip_model():
    text = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=VISION))


def _blip_retrieval():
    text = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, encoder_hidden_size=64)
    model = transformers.BlipForImageTextRetrieval(transformers.BlipConfig(
        text_config=text, vision_config=VISION, image_text_hidden_size=32))
    return randomized(model)


def randomized(model):
    """Weights of a usable scale (BLIP's initialisation leaves tiny random models degenerate)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                parameter.fill_(1.0)
            else:
                scale = 0.1 if parameter.dim() > 1 else 0.02
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


CAPTION_IDS = torch.randint(3, 120, (3, 10), generator=torch.Generator().manual_seed(4))


VISION_MODELS = {
    "ViTModel": (lambda: _vit(transformers.ViTModel), 1, lambda out: out.last_hidden_state[:, 0]),
    "ViTForImageClassification": (lambda: _vit(transformers.ViTForImageClassification), 1,
                                  lambda out: out.logits),
    "DeiTModel": (lambda: _deit(transformers.DeiTModel), 2, lambda out: out.pooler_output),
    "DeiTForImageClassificationWithTeacher": (
        lambda: _deit(transformers.DeiTForImageClassificationWithTeacher), 2,
        lambda out: out.logits),
    "CLIPVisionModel": (lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)),
                        1, lambda out: out.pooler_output),
    "CLIPModel": (_clip_model, 1, None),
    "DeiTForImageClassification": (lambda: _deit(transformers.DeiTForImageClassification), 2,
                                   lambda out: out.logits),
    "CLIPVisionModelWithProjection": (
        lambda: transformers.CLIPVisionModelWithProjection(
            transformers.CLIPVisionConfig(**VISION, projection_dim=32)), 1,
        lambda out: out.image_embeds),
    "SiglipModel": (lambda: transformers.SiglipModel(transformers.SiglipConfig(
        text_config=dict(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64),
        vision_config=VISION)), 0, None),
    "BlipVisionModel": (lambda: randomized(transformers.BlipVisionModel(
        transformers.BlipVisionConfig(**VISION))), 1, lambda out: out.pooler_output),
    "BlipForImageTextRetrieval": (_blip_retrieval, 1, None),
    "SiglipVisionModel": (
        lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)), 0,
        lambda out: out.pooler_output),
}

TEXT_MODELS = {
    "BertModel": (lambda: transformers.BertModel(transformers.BertConfig(**TEXT)),
                  lambda out: out.pooler_output),
    "BertForSequenceClassification": (
        lambda: transformers.BertForSequenceClassification(transformers.BertConfig(**TEXT, num_labels=3)),
        lambda out: out.logits),
    "RobertaModel": (
        lambda: transformers.RobertaModel(transformers.RobertaConfig(**TEXT, pad_token_id=1)),
        lambda out: out.last_hidden_state[:, 0]),
    "RobertaForSequenceClassification": (
        lambda: transformers.RobertaForSequenceClassification(
            transformers.RobertaConfig(**TEXT, pad_token_id=1, num_labels=3)),
        lambda out: out.logits),
    "DistilBertModel": (
        lambda: transformers.DistilBertModel(transformers.DistilBertConfig(
            vocab_size=120, dim=64, n_layers=4, n_heads=4, hidden_dim=128)),
        lambda out: out.last_hidden_state[:, 0]),
    "DistilBertForSequenceClassification": (
        lambda: transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
            vocab_size=120, dim=64, n_layers=4, n_heads=4, hidden_dim=128, num_labels=3)),
        lambda out: out.logits),
}


def build(name: str, table: dict, dtype=torch.float32, train: bool = False):
    torch.manual_seed(0)
    model = table[name][0]().to(dtype)
    return model.train() if train else model.eval()


def images(batch: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(dtype)


def vision_output(name: str, model, pixels: torch.Tensor) -> torch.Tensor:
    if name in ("CLIPModel", "SiglipModel"):
        features = model.get_image_features(pixel_values=pixels)
        return getattr(features, "pooler_output", features)
    if name == "BlipForImageTextRetrieval":  # image-text matching: text cross-attends to image
        ids = CAPTION_IDS[:pixels.shape[0]]
        return model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).itm_score
    return VISION_MODELS[name][2](model(pixel_values=pixels))


def sentences(batch: int, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (no special ids below 3) and a right-padded mask of varied lengths."""
    ids = torch.randint(3, 120, (batch, length), generator=torch.Generator().manual_seed(2))
    lengths = [length - 7 * (i % 3) for i in range(batch)]
    mask = (torch.arange(length) < torch.tensor(lengths)[:, None]).long()
    return ids * mask + (1 - mask), mask


def text_output(name: str, model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return TEXT_MODELS[name][1](model(input_ids=ids, attention_mask=mask))


@pytest.mark.parametrize("name", VISION_MODELS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_ratio_one_is_identity_and_unpatch_exact(name, batch, dtype):
    model = build(name, VISION_MODELS, dtype)
    pixels = images(batch, dtype)
    with torch.no_grad():
        reference = vision_output(name, model, pixels)
        pitome.patch(model, algo="pitome", ratio=1.0)
        assert torch.equal(vision_output(name, model, pixels), reference)
        pitome.patch(model, algo="tome", ratio=0.8)
        assert not torch.equal(vision_output(name, model, pixels), reference)
        pitome.unpatch(model)
        assert torch.equal(vision_output(name, model, pixels), reference)
    assert not any("pitome" in key for key in model.state_dict())


@pytest.mark.parametrize("name", VISION_MODELS)
@pytest.mark.parametrize("algo", ["pitome", "pitome_paper", "tome", "mctf", "prune"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_invariants(name, algo, dtype):
    model = build(name, VISION_MODELS, dtype)
    prefix = VISION_MODELS[name][1]
    pitome.patch(model, algo=algo, ratio=0.85, trace_source=algo != "prune")
    with torch.no_grad():
        out = vision_output(name, model, images(2, dtype))
    assert torch.isfinite(out.float()).all()
    info = pitome.merge_info(model)
    tokens = 64 + prefix
    # 64 patches at ρ = 0.85: r = ⌊64 − 54.4⌋ = 9, ⌊55 − 46.75⌋ = 8, ⌊47 − 39.95⌋ = 7, ⌊40 − 34⌋ = 6.
    assert info.token_counts == [tokens, tokens - 9, tokens - 17, tokens - 24, tokens - 30]
    if algo == "prune":
        return
    assert torch.equal(info.sizes.sum(dim=1).flatten(), torch.full((2,), float(tokens)))
    source = info.source
    assert torch.equal(source.sum(dim=1), torch.ones(2, tokens))  # a partition of the input
    assert torch.equal(source[:, :prefix, :prefix], torch.eye(prefix).expand(2, -1, -1))
    assert source[:, prefix:, :prefix].sum() == 0


@pytest.mark.parametrize("name", TEXT_MODELS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_text_ratio_one_is_identity_and_unpatch_exact(name, batch, dtype):
    model = build(name, TEXT_MODELS, dtype)
    ids, mask = sentences(batch)
    with torch.no_grad():
        reference = text_output(name, model, ids, mask)
        pitome.patch(model, ratio=1.0)
        assert torch.equal(text_output(name, model, ids, mask), reference)
        pitome.patch(model, ratio=0.7)
        assert not torch.equal(text_output(name, model, ids, mask), reference)
        pitome.unpatch(model)
        assert torch.equal(text_output(name, model, ids, mask), reference)


@pytest.mark.parametrize("name", TEXT_MODELS)
@pytest.mark.parametrize("algo", ["pitome", "tome", "tofu", "dct", "diffrate", "crossget"])
def test_text_padding_never_mixes_and_sizes_add_up(name, algo):
    model = build(name, TEXT_MODELS)
    ids, mask = sentences(3)
    pitome.patch(model, algo=algo, ratio=0.7, trace_source=algo != "dct")
    with torch.no_grad():
        text_output(name, model, ids, mask)
    info = pitome.merge_info(model)
    lengths = mask.sum(dim=1)
    assert info.token_counts[0] == 24 and info.merges[3] == 0  # the first three blocks merge
    # Each sentence by its own length at ρ = 0.7 (23 mergeable: r = 6, 5, 3; 16: 4, 3, 2;
    # 9: 2, 2, 1) keeps 24 → 10, 17 → 8 and 10 → 5 real tokens.
    assert lengths.tolist() == [24, 17, 10]
    assert info.padding.sum(dim=1).tolist() == [10, 8, 5]
    if info.source is not None:
        holds_real = (info.source * mask[:, None, :]).sum(dim=-1) > 0
        holds_padding = (info.source * (1 - mask)[:, None, :]).sum(dim=-1) > 0
        assert not (holds_real & holds_padding).any()
        assert torch.equal(holds_real, info.padding)
    if algo in ("tofu", "dct"):
        return  # ToFu prunes in its first blocks and DCT mixes: neither conserves tokens
    real_sizes = (info.sizes[..., 0] * info.padding).sum(dim=1)
    assert torch.equal(real_sizes, lengths.float())
    covered = (info.source * info.padding[..., None]).sum(dim=1)
    assert torch.equal(covered, mask.float())  # every real token in exactly one real output
    assert torch.equal(info.source[:, 0, :], torch.eye(24)[0].expand(3, -1))  # CLS untouched


@pytest.mark.parametrize("name", TEXT_MODELS)
@pytest.mark.parametrize("algo", ["pitome", "tome", "mctf"])
def test_text_output_does_not_depend_on_the_batch(name, algo):
    model = build(name, TEXT_MODELS)
    ids, mask = sentences(3)
    pitome.patch(model, algo=algo, ratio=0.7)
    with torch.no_grad():
        together = text_output(name, model, ids, mask)
        for row in range(3):
            length = int(mask[row].sum())
            alone = text_output(name, model, ids[row:row + 1, :length], mask[row:row + 1, :length])
            torch.testing.assert_close(alone[0], together[row], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["ViTForImageClassification", "CLIPVisionModel"])
def test_vision_train_mode_backpropagates(name):
    model = build(name, VISION_MODELS, train=True)
    pitome.patch(model, algo="pitome", ratio=0.8)
    vision_output(name, model, images(2)).float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads[:5])


@pytest.mark.parametrize("name", ["BertForSequenceClassification", "DistilBertModel"])
def test_text_train_mode_backpropagates(name):
    model = build(name, TEXT_MODELS, train=True)
    pitome.patch(model, algo="pitome", ratio=0.7)
    ids, mask = sentences(3)
    text_output(name, model, ids, mask).sum().backward()
    embeddings = model.get_input_embeddings().weight.grad
    assert embeddings is not None and torch.isfinite(embeddings).all()


def test_text_models_use_the_text_variant_and_first_three_blocks():
    model = build("BertModel", TEXT_MODELS)
    pitome.patch(model)
    ids, mask = sentences(2)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    info = pitome.merge_info(model)
    assert info.algo == "pitome_text"
    assert info.merges[:3] == [2, 2, 1] and info.merges[3] == 0


def test_pooling_weights_give_the_mean_over_real_tokens():
    from pitome.tasks.text import mean_pooled

    model = build("BertModel", TEXT_MODELS)
    ids, mask = sentences(3)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = (plain * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(mean_pooled(model, plain, mask), expected)
        pitome.patch(model, ratio=0.7)
        merged = model(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = pitome.pooling_weights(model)
    assert weights.shape[:2] == merged.shape[:2]
    assert torch.equal(weights.sum(dim=(1, 2)), mask.sum(dim=1).float())


def test_left_padding_is_refused_clearly():
    model = build("BertModel", TEXT_MODELS)
    ids, mask = sentences(3)
    pitome.patch(model, ratio=0.7)
    with pytest.raises(ValueError, match="right-padded"):
        model(input_ids=ids, attention_mask=mask.flip(-1))


def test_unsupported_hf_model_lists_what_is_supported():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)
    with pytest.raises(pitome.UnsupportedModelError, match="BertForSequenceClassification"):
        pitome.patch(transformers.GPT2Model(config))


def test_blip_text_cross_attends_with_merged_sizes():
    model = build("BlipForImageTextRetrieval", VISION_MODELS)
    pixels, ids = images(2), CAPTION_IDS[:2]
    pitome.patch(model, algo="tome", ratio=0.8, prop_attn=True)
    with torch.no_grad():
        score = model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).itm_score
        image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
        sizes = pitome.merge_info(model).sizes
        assert image_embeds.shape[1] == 29 and sizes.shape[1] == 29
        text = model.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  encoder_hidden_states=image_embeds,
                                  encoder_attention_mask=sizes[..., 0].log()[:, None, None, :])
        torch.testing.assert_close(model.itm_head(text.last_hidden_state[:, 0]), score)
        pitome.patch(model, algo="tome", ratio=0.8, prop_attn=False)
        plain = model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).itm_score
    assert not torch.allclose(plain, score)


def _llava():
    from pitome.adapters.llava import unmerged_image_tokens

    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION),
        text_config=transformers.LlamaConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4,
                                             intermediate_size=128, pad_token_id=0),
        image_token_id=150, vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = transformers.LlavaForConditionalGeneration(config).eval()
    full = unmerged_image_tokens(model)
    # Two prompts of different lengths, left-padded as LLaVA processors pad for generation.
    ids = torch.tensor([[0, 0, 1] + [150] * full + [5, 6, 7], [1, 3, 4] + [150] * full + [5, 6, 7]])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=images(2))


@pytest.mark.skipif(hasattr(transformers.LlavaForConditionalGeneration,
                            "_merge_input_ids_with_image_features"),
                    reason="transformers < 4.48 expands image placeholders itself; pitome refuses")
def test_llava_generates_with_fewer_image_tokens():
    from pitome.adapters.llava import fit_image_placeholders, image_tokens

    model, inputs = _llava()
    options = dict(max_new_tokens=4, do_sample=False)
    reference = model.generate(**inputs, **options)
    pitome.patch(model, ratio=1.0)
    assert torch.equal(model.generate(**inputs, **options), reference)

    pitome.patch(model, algo="pitome", ratio=0.8)
    assert image_tokens(model) == 34  # 65 tokens -> 35 entering the last layer, minus CLS
    fitted = fit_image_placeholders(model, inputs)
    assert (fitted["input_ids"] == 150).sum(dim=1).tolist() == [34, 34]
    assert fitted["attention_mask"].sum(dim=1).tolist() == [38, 40]
    assert fitted["attention_mask"][0, :2].tolist() == [0, 0]  # padding stays on the left
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]),
        with_kwargs=True)
    try:
        first = model.generate(**fitted, **options)
        again = model.generate(**fitted, **options)
    finally:
        hook.remove()
    assert seen[0] == fitted["input_ids"].shape[1] == 40  # the prompt holds the merged count
    assert torch.equal(first, again) and first.shape == (2, 44)
    # Block 3's output is not read (vision_feature_layer=-2), so it merges nothing.
    assert pitome.merge_info(model).token_counts == [65, 53, 43, 35, 35]
    unfitted = model.generate(**inputs, **options)  # the patched model fits them itself
    assert torch.equal(unfitted[:, inputs["input_ids"].shape[1]:], first[:, 40:])

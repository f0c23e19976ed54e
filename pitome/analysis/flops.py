"""Analytic multiply-accumulate counts of a ViT, or of a BERT-family text encoder, under a
token schedule (docs/method.md §7).

timm and fvcore report multiply-accumulates as "FLOPs"; so do we. Per block with ``N``
tokens in, ``N′`` out, width ``C`` and MLP hidden width ``H``: attention ``4NC² + 2N²C``
(q, k, v, output projections and the two ``N×N`` products), MLP ``2N′CH`` (``8N′C²`` at
ratio 4). Patch embedding and head are added for totals. The merge itself is counted apart:
its cost depends on the algorithm, not on the model.

A text encoder merges every sentence by the schedule of its own length, so its count is a
mean over sentence lengths (:func:`text_macs`): the same blocks, no patch embedding (token
embeddings are lookups), and a head (pooler, classifier) applied to one token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ..core.schedule import TokenSchedule, token_counts

if TYPE_CHECKING:
    from ..core.registry import Algorithm


@dataclass(frozen=True)
class VitShape:
    """What the MAC count of a ViT depends on."""

    width: int
    mlp_hidden: int
    num_blocks: int
    patch_embed_macs_per_token: int
    head_macs: int

    @classmethod
    def of(cls, model: nn.Module) -> VitShape:
        """Read the shape of a timm ``VisionTransformer`` or a Hugging Face ViT/DeiT."""
        if not hasattr(model, "blocks"):
            return cls._of_hugging_face(model)
        block = model.blocks[0]
        conv = model.patch_embed.proj
        patch_macs = conv.in_channels * conv.out_channels
        for size in conv.kernel_size:
            patch_macs *= size
        head = model.head
        head_macs = head.in_features * head.out_features if isinstance(head, nn.Linear) else 0
        return cls(width=model.embed_dim, mlp_hidden=block.mlp.fc1.out_features,
                   num_blocks=len(model.blocks), patch_embed_macs_per_token=patch_macs,
                   head_macs=head_macs)


    @classmethod
    def _of_hugging_face(cls, model: nn.Module) -> VitShape:
        config, embeddings = model.config, _hf_embeddings(model)
        conv = embeddings.patch_embeddings.projection
        patch_macs = conv.in_channels * conv.out_channels * conv.kernel_size[0] * \
            conv.kernel_size[1]
        head_macs = sum(module.in_features * module.out_features for name in
                        ("classifier", "distillation_classifier", "cls_classifier")
                        if isinstance(module := getattr(model, name, None), nn.Linear))
        return cls(width=config.hidden_size, mlp_hidden=config.intermediate_size,
                   num_blocks=config.num_hidden_layers, patch_embed_macs_per_token=patch_macs,
                   head_macs=head_macs)


def _hf_embeddings(model: nn.Module) -> nn.Module:
    for owner in (model, getattr(model, "vit", None), getattr(model, "deit", None)):
        embeddings = getattr(owner, "embeddings", None)
        if embeddings is not None and hasattr(embeddings, "patch_embeddings"):
            return embeddings
    raise TypeError(f"pitome.analysis.flops reads timm ViTs and Hugging Face ViT/DeiT, not a "
                    f"{type(model).__name__}; use counted_flops(model, inputs) for others")


def _tokens_and_prefix(model: nn.Module) -> tuple[int, int]:
    """Patches and prefix tokens of a timm or Hugging Face ViT/DeiT."""
    if hasattr(model, "patch_embed"):
        return model.patch_embed.num_patches, model.num_prefix_tokens
    embeddings = _hf_embeddings(model)
    prefix = 1 + int(getattr(embeddings, "distillation_token", None) is not None)
    return embeddings.patch_embeddings.num_patches, prefix


def block_macs(tokens_in: int, tokens_out: int, width: int, mlp_hidden: int) -> int:
    """MACs of one transformer block that merges between attention and MLP."""
    attention = 4 * tokens_in * width ** 2 + 2 * tokens_in ** 2 * width
    return attention + 2 * tokens_out * width * mlp_hidden


def vit_macs(shape: VitShape, token_counts: Sequence[int], num_patches: int) -> int:
    """MACs of one image through a ViT whose blocks see ``token_counts`` (L + 1 entries)."""
    if len(token_counts) != shape.num_blocks + 1:
        raise ValueError(f"need {shape.num_blocks + 1} token counts (one per block and the "
                         f"output), got {len(token_counts)}")
    total = num_patches * shape.patch_embed_macs_per_token + shape.head_macs
    for tokens_in, tokens_out in zip(token_counts[:-1], token_counts[1:]):
        total += block_macs(tokens_in, tokens_out, shape.width, shape.mlp_hidden)
    return total


def similarity_macs(algorithm: object, token_counts: Sequence[int], num_prefix: int,
                    metric_width: int) -> int:
    """MACs of the merge planning itself: the cosine products each merging block computes.

    Algorithms say how many token pairs they compare through ``similarity_pairs(mergeable,
    block, num_blocks)``: PiToMe compares all ``T′`` mergeable tokens with each other
    (``T′²``), ToMe set A with set B (``(T′/2)²``). Algorithms that do not say are counted
    as comparing all pairs. Everything else in a merge is memory traffic, not arithmetic.
    """
    num_blocks = len(token_counts) - 1
    return sum(merge_macs(algorithm, block, num_blocks, tokens_in - num_prefix, metric_width,
                          tokens_in - tokens_out)
               for block, (tokens_in, tokens_out) in enumerate(zip(token_counts[:-1],
                                                                   token_counts[1:]))
               if tokens_in != tokens_out)


def merge_macs(algorithm: Algorithm, block: int, num_blocks: int, mergeable: int,
               metric_width: int, r: int) -> int:
    """Similarity MACs of one merging block removing ``r`` tokens (see
    :func:`similarity_macs`)."""
    return algorithm.similarity_pairs(mergeable, block, num_blocks, r) * metric_width


@dataclass(frozen=True)
class BlockCost:
    """One block's multiply-accumulates per image."""

    block: int
    tokens_in: int
    tokens_out: int
    attention_macs: int
    mlp_macs: int
    merge_macs: int


@dataclass(frozen=True)
class FlopsReport:
    """Multiply-accumulates (MACs) per image; ``flops`` counts each MAC as 2 operations."""

    blocks: list[BlockCost]
    embed_macs: int
    head_macs: int

    @property
    def model_macs(self) -> int:
        return self.embed_macs + self.head_macs + sum(
            b.attention_macs + b.mlp_macs for b in self.blocks)

    @property
    def merge_macs(self) -> int:
        return sum(b.merge_macs for b in self.blocks)

    @property
    def total_macs(self) -> int:
        return self.model_macs + self.merge_macs

    @property
    def total_flops(self) -> int:
        return 2 * self.total_macs


def token_layout(model: nn.Module) -> tuple[int, int]:
    """``(tokens, prefix)``: tokens entering the first block of a timm or Hugging Face
    ViT/DeiT, and how many of them are prefix tokens (class, distillation, registers)."""
    patches, prefix = _tokens_and_prefix(model)
    return patches + prefix, prefix


def schedule_macs(model: nn.Module, merges: Sequence[int],
                  algorithm: Algorithm | None = None) -> int:
    """MACs per image of a timm or Hugging Face ViT/DeiT whose blocks merge away ``merges``
    tokens (one count per block), counted without running it: what :func:`flops` reports
    as ``total_macs`` for a model patched with ``r=merges`` (the merge's similarity
    products included when ``algorithm`` is given)."""
    shape = VitShape.of(model)
    num_patches, prefix = _tokens_and_prefix(model)
    if len(merges) != shape.num_blocks:
        raise ValueError(f"merges lists {len(merges)} counts but the model has "
                         f"{shape.num_blocks} blocks: give one per block")
    counts = token_counts(num_patches + prefix, merges)
    total = vit_macs(shape, counts, num_patches)
    if algorithm is not None:
        heads = model.blocks[0].attn.num_heads if hasattr(model, "blocks") else \
            model.config.num_attention_heads
        total += similarity_macs(algorithm, counts, prefix, shape.width // heads)
    return total


def flops(model: nn.Module, inputs) -> FlopsReport:
    """Per-block MACs of a (patched or unpatched) timm ViT, or Hugging Face ViT/DeiT, on
    ``inputs``, per image.

    Runs one forward to read the token counts the merges produced, then counts analytically
    (docs/method.md §7): attention ``4NC² + 2N²C``, MLP ``2N′CH``, plus patch embedding, head and, apart,
    the merge's own similarity products.
    """
    import torch

    from ..api import merge_config, merge_info

    with torch.no_grad():
        model(inputs)
    shape = VitShape.of(model)
    num_patches, prefix = _tokens_and_prefix(model)
    config = merge_config(model)
    info = merge_info(model) if config is not None else None
    counts = info.token_counts if info is not None else [num_patches + prefix] * (
        shape.num_blocks + 1)
    width = shape.width
    heads = model.blocks[0].attn.num_heads if hasattr(model, "blocks") else \
        model.config.num_attention_heads
    head_dim = width // heads
    blocks = []
    for index, (tokens_in, tokens_out) in enumerate(zip(counts[:-1], counts[1:])):
        merge = 0 if config is None or tokens_in == tokens_out else merge_macs(
            config.algorithm, index, shape.num_blocks, tokens_in - prefix, head_dim,
            tokens_in - tokens_out)
        blocks.append(BlockCost(index, tokens_in, tokens_out,
                                4 * tokens_in * width ** 2 + 2 * tokens_in ** 2 * width,
                                2 * tokens_out * width * shape.mlp_hidden, merge))
    return FlopsReport(blocks, num_patches * shape.patch_embed_macs_per_token, shape.head_macs)


def counted_flops(model: nn.Module, inputs) -> int:
    """FLOPs of one forward as ``torch.utils.flop_counter`` counts them, per example.

    ``inputs`` is a batch tensor or a dict of keyword inputs (e.g. a tokenizer's output).
    Attention runs through the math backend here: the counter does not see every fused
    kernel (the CPU flash kernel, for one), while it counts the math path's products.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        if isinstance(inputs, torch.Tensor):
            model(inputs)
            batch = inputs.shape[0]
        else:
            model(**inputs)
            batch = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
    return counter.get_total_flops() // batch


# ----------------------------------------------------------------------------- text encoders
TEXT_FAMILIES = ("BERT", "RoBERTa", "DistilBERT")


@dataclass(frozen=True)
class TextShape:
    """What the MAC count of a BERT-family text encoder depends on."""

    width: int
    mlp_hidden: int
    num_blocks: int
    heads: int
    num_prefix: int
    head_macs: int

    @classmethod
    def of(cls, model: nn.Module) -> TextShape:
        """Read the shape of a Hugging Face BERT, RoBERTa or DistilBERT model (MiniLM is a
        ``BertModel``), with or without a classification head, or of a sentence-transformers
        model over one. Raises TypeError for anything else."""
        from ..adapters.hf import HuggingFaceAdapter
        from ..adapters.sentence_transformers import SentenceTransformersAdapter

        hf, outer = HuggingFaceAdapter(), model
        if SentenceTransformersAdapter().matches(model):
            model = SentenceTransformersAdapter().encoder(model)
        family = hf.family(model)
        if family is None or family.name not in TEXT_FAMILIES:
            raise TypeError(f"pitome.analysis.flops counts text encoders of the Hugging Face "
                            f"{', '.join(TEXT_FAMILIES)} families (or sentence-transformers "
                            f"over one), not a {type(outer).__name__}")
        config, layers = model.config, hf.stack(model)
        width = getattr(config, "hidden_size", None) or config.dim
        hidden = getattr(config, "intermediate_size", None) or config.hidden_dim
        heads = getattr(config, "num_attention_heads", None) or config.n_heads
        in_layers = {id(module) for module in layers.modules()}
        head = sum(module.in_features * module.out_features for module in outer.modules()
                   if isinstance(module, nn.Linear) and id(module) not in in_layers)
        return cls(width=width, mlp_hidden=hidden, num_blocks=len(layers), heads=heads,
                   num_prefix=family.num_prefix, head_macs=head)


def sentence_macs(shape: TextShape, token_counts: Sequence[int]) -> int:
    """MACs of one sentence through a text encoder whose blocks see ``token_counts``
    (L + 1 entries): the blocks, and the head on one token (pooler, classifier)."""
    if len(token_counts) != shape.num_blocks + 1:
        raise ValueError(f"need {shape.num_blocks + 1} token counts (one per block and the "
                         f"output), got {len(token_counts)}")
    return shape.head_macs + sum(block_macs(tokens_in, tokens_out, shape.width, shape.mlp_hidden)
                                 for tokens_in, tokens_out in zip(token_counts[:-1],
                                                                  token_counts[1:]))


def text_macs(model: nn.Module, schedule: TokenSchedule | None, lengths: Sequence[int],
              algorithm: Algorithm | None = None) -> float:
    """Mean MACs per sentence of a BERT-family text encoder (see :class:`TextShape`) over
    sentences of ``lengths`` real tokens each (CLS and SEP included, padding not), each
    merged by ``schedule`` as the text runtime merges it
    (:meth:`~pitome.core.schedule.TokenSchedule.sentence_plan`); None counts the unmerged
    model. The merge's similarity products are included when ``algorithm`` is given.

    Build ``schedule`` as ``pitome.patch`` does (``pitome.merge_config(model).schedule`` of
    a patched model is one): its ``merge_blocks`` and ``count_prefix`` change the counts."""
    by_length = Counter(_length(length) for length in lengths)
    if not by_length:
        raise ValueError("lengths holds no sentence lengths")
    return length_macs(TextShape.of(model), schedule, by_length, algorithm) / \
        sum(by_length.values())


def length_macs(shape: TextShape, schedule: TokenSchedule | None, by_length: Mapping[int, int],
                algorithm: Algorithm | None = None) -> int:
    """Total MACs of ``by_length[L]`` sentences of each length ``L`` (see :func:`text_macs`,
    which is this over the sentence count)."""
    if schedule is not None:
        schedule.check_depth(shape.num_blocks)
    total = 0
    for length, count in by_length.items():
        merges = [0] * shape.num_blocks if schedule is None else \
            schedule.sentence_plan(length, shape.num_prefix, shape.num_blocks)
        counts = token_counts(length, merges)
        macs = sentence_macs(shape, counts)
        if algorithm is not None:
            macs += similarity_macs(algorithm, counts, shape.num_prefix,
                                    shape.width // shape.heads)
        total += count * macs
    return total


def _length(length: object) -> int:
    value = getattr(length, "item", lambda: length)()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"a sentence length is a whole number of tokens >= 1, got {length!r}")
    return value

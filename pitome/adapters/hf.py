"""Hugging Face transformers 4.x and 5.x: ViT, DeiT, CLIP, SigLIP and BLIP vision towers, BERT,
RoBERTa, DistilBERT.

Each patched layer composes the layer's own submodules (norms, the attention module, the
MLP) and merges between attention and MLP; the attention module is still the library's own,
dispatched through its attention-function interface (sdpa or eager), and receives pitome's
additive key bias (proportional attention, padding) as its attention mask. The merging
metric, the attention keys averaged over heads, is read by a forward hook on the key
projection, so no projection runs twice.

The model's own forward stays in charge: it loops over the layers and builds its output
classes; the layers share the forward's session through :mod:`pitome.runtime.layers` (the
first opens it, the last closes it and records :func:`pitome.merge_info`).

transformers 4.x differs in three ways, each handled per layer rather than per version: layers
whose forward takes ``output_attentions`` return ``(hidden_states,)``; ViT/DeiT layers keep the
attention in ``attention.attention`` with an output projection and a separate MLP
(``intermediate``/``output``); and ViT/DeiT and DistilBERT attention modules take no additive
mask. Those layers call their attention module with the model's own mask while no token has
merged (so nothing changes), and afterwards run scaled-dot-product attention from the module's
own projections with pitome's key bias.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.attention import multihead_attention, split_heads
from ..core.registry import canonical_name
from ..core.schedule import LinearMargin, MarginSpec
from ..kernels.attention import proportional_attention
from ..runtime.layers import INDEX_ATTR, RUNTIME_ATTR, TUPLE_ATTR, MergingLayer, ProjectionTap
from ..runtime.patcher import Patch, class_names
from ..runtime.session import Runtime, Session
from ..runtime.state import MergeConfig, MergeState
from . import llava
from .base import UnsupportedModelError

TESTED = "transformers 4.45, 4.57, 5.17 and 5.24"


class MergingPreNormLayer(MergingLayer):
    """ViT/DeiT (``layernorm_before``…) and CLIP/SigLIP (``layer_norm1``…) pre-norm layers."""

    def _pitome_layer(self, session: Session, hidden_states: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        # Image tokens are never padded; the all-valid mask some transformers versions hand
        # vision layers is replaced by pitome's key bias.
        state = self._pitome_state(session, hidden_states, None)
        norm1, attention, norm2 = self._pitome_parts()
        h = norm1(hidden_states)
        output = getattr(attention, "out_proj", None) or getattr(attention, "o_proj", None)
        bias = None
        if state.biased and output is not None:
            h = output(sized_attention(attention, h, state))
        else:
            bias = state.attention_bias(hidden_states.dtype)
            h = attention(h, attention_mask=bias)[0]
        dropout = getattr(self, "dropout", None)
        h = dropout(h) if dropout is not None else h
        x = self._pitome_merge(session, hidden_states, bias, _scale(attention, h.shape[-1]), h)
        h = self.mlp(norm2(x))
        return x + (dropout(h) if dropout is not None else h)

    def _pitome_parts(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        if hasattr(self, "layernorm_before"):
            return self.layernorm_before, self.attention, self.layernorm_after
        return self.layer_norm1, self.self_attn, self.layer_norm2


class MergingBertLayer(MergingLayer):
    """BERT/RoBERTa post-norm layer: attention sub-block (with its residual norm), merge, FFN."""

    packs = True

    def _pitome_layer(self, session: Session, hidden_states: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        state = self._pitome_state(session, hidden_states, attention_mask)
        if state.packed is not None:
            inner = self.attention.self
            x = state.packed.layout.pack(hidden_states)
            h, keys = packed_attention(session, inner, x, inner.query, inner.key, inner.value)
            x = self._pitome_packed_merge(session, self.attention.output(h, x), keys)
            return state.packed.layout.pad(self.feed_forward_chunk(x))
        bias = state.attention_bias(hidden_states.dtype)
        x = self.attention(hidden_states, bias)[0]
        x = self._pitome_merge(session, x, bias, _scale(self.attention.self, x.shape[-1]))
        return self.feed_forward_chunk(x)


class MergingDistilBertLayer(MergingLayer):
    """DistilBERT's ``TransformerBlock``: attention, residual norm, merge, FFN, residual norm."""

    packs = True

    def _pitome_layer(self, session: Session, hidden_states: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        state = self._pitome_state(session, hidden_states, attention_mask)
        if state.packed is not None:
            return packed_distilbert_layer(self, session, hidden_states)
        bias = state.attention_bias(hidden_states.dtype)
        h, _ = self.attention(hidden_states, attention_mask=bias)
        x = self.sa_layer_norm(h + hidden_states)
        x = self._pitome_merge(session, x, bias, self.attention.scaling)
        return self.output_layer_norm(self.ffn(x) + x)


class MergingViTOutputLayer(MergingLayer):
    """ViT/DeiT in transformers 4.x: pre-norm attention (self-attention and its ``output``
    projection), merge, ``intermediate`` and ``output`` (which adds the residual)."""

    def _pitome_layer(self, session: Session, hidden_states: torch.Tensor,
                      head_mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        state = self._pitome_state(session, hidden_states, None)
        bias = state.attention_bias(hidden_states.dtype)
        inner = self.attention.attention
        h = self.layernorm_before(hidden_states)
        if self._pitome_unmerged(session, hidden_states):
            h = self.attention(h, head_mask)
            h = h[0] if isinstance(h, tuple) else h
        else:
            h = self.attention.output(projected_attention(inner, h, bias, inner.query, inner.key,
                                                          inner.value), h)
        x = self._pitome_merge(session, hidden_states, bias, _scale(inner, h.shape[-1]), h)
        return self.output(self.intermediate(self.layernorm_after(x)), x)


class MergingDistilBertMaskLayer(MergingLayer):
    """DistilBERT's ``TransformerBlock`` in transformers 4.x, whose attention takes
    ``(query, key, value, mask)``; the block otherwise as :class:`MergingDistilBertLayer`."""

    packs = True

    def _pitome_layer(self, session: Session, x: torch.Tensor,
                      attn_mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        state = self._pitome_state(session, x, attn_mask)
        if state.packed is not None:
            return packed_distilbert_layer(self, session, x)
        bias = state.attention_bias(x.dtype)
        attention = self.attention
        if self._pitome_unmerged(session, x):
            h = attention(x, x, x, attn_mask)[0]
        else:
            h = attention.out_lin(projected_attention(attention, x, bias, attention.q_lin,
                                                      attention.k_lin, attention.v_lin))
        x = self.sa_layer_norm(h + x)
        x = self._pitome_merge(session, x, bias, _scale(attention, x.shape[-1]))
        return self.output_layer_norm(self.ffn(x) + x)


class MergingFusedQKVLayer(MergingLayer):
    """BLIP's vision layer, whose attention takes no mask: with a key bias to apply, the
    layer runs the attention itself from the module's own ``qkv`` and ``projection``."""

    def _pitome_layer(self, session: Session, hidden_states: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        state = self._pitome_state(session, hidden_states, None)  # image tokens: no padding
        attention = self.self_attn
        h = self.layer_norm1(hidden_states)
        h = biased_attention(attention, h, state) if state.biased else attention(hidden_states=h)[0]
        x = self._pitome_merge(session, hidden_states, None, attention.scale, h)
        return x + self.mlp(self.layer_norm2(x))


def packed_distilbert_layer(layer: nn.Module, session: Session, x: torch.Tensor
                            ) -> torch.Tensor:
    """A DistilBERT block over its padded input's real tokens, packed (see
    :func:`packed_attention`)."""
    attention, run = layer.attention, session.state.packed  # type: ignore[union-attr]
    x = run.layout.pack(x)
    h, keys = packed_attention(session, attention, x, attention.q_lin, attention.k_lin,
                               attention.v_lin)
    x = layer.sa_layer_norm(attention.out_lin(h) + x)
    x = layer._pitome_packed_merge(session, x, keys)
    return run.layout.pad(layer.output_layer_norm(layer.ffn(x) + x))


def packed_attention(session: Session, attention: nn.Module, x: torch.Tensor,
                     query: nn.Module, key: nn.Module, value: nn.Module
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed ``1×N×C`` tokens within each sentence, from ``attention``'s own
    projections, which run on the packed tokens; the attention itself re-pads them to the
    longest sentence. Returns the packed output before the output projection and the
    padded ``B×W×C`` keys (the merge's metric)."""
    run = session.state.packed  # type: ignore[union-attr]
    q, k, v = (run.layout.pad(projection(x)) for projection in (query, key, value))
    out = multihead_attention(q, k, v, _head_count(attention), run.key_bias(q.dtype),
                              _dropout(attention), _scale(attention, x.shape[-1]))
    return run.layout.pack(out), k


def biased_attention(attention: nn.Module, x: torch.Tensor, state: MergeState) -> torch.Tensor:
    """Proportional attention of a ``qkv``/``projection`` module (image tokens, never padded)
    in the fused kernel where it runs."""
    q, k, v = (split_heads(t, attention.num_heads) for t in attention.qkv(x).chunk(3, dim=-1))
    sizes = state.sizes if state.config.prop_attn else None
    out = proportional_attention(q, k, v, sizes, attention.scale, _dropout(attention))
    return attention.projection(out)


def sized_attention(attention: nn.Module, x: torch.Tensor, state: MergeState) -> torch.Tensor:
    """Proportional attention over ``attention``'s ``q_proj``/``k_proj``/``v_proj`` (image
    tokens, never padded) in the fused kernel where it runs, before the output projection."""
    heads = _head_count(attention)
    q, k, v = (split_heads(projection(x), heads)
               for projection in (attention.q_proj, attention.k_proj, attention.v_proj))
    sizes = state.sizes if state.config.prop_attn else None
    return proportional_attention(q, k, v, sizes, _scale(attention, x.shape[-1]),
                                  _dropout(attention))


def projected_attention(attention: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
                        query: nn.Module, key: nn.Module, value: nn.Module) -> torch.Tensor:
    """Scaled-dot-product attention over ``attention``'s own query, key and value projections
    with a key bias, before the output projection (``B×T×width``)."""
    return multihead_attention(query(x), key(x), value(x), _head_count(attention), bias,
                               _dropout(attention), _scale(attention, x.shape[-1]))


def _head_count(attention: nn.Module) -> int | None:
    for name in ("num_attention_heads", "num_heads", "n_heads"):
        value = getattr(attention, name, None)
        if isinstance(value, int):
            return value
    return None


def _scale(attention: nn.Module, width: int) -> float:
    """The attention's query-key scale (transformers 4.x leaves it implicit in some models)."""
    for name in ("scaling", "scale"):
        value = getattr(attention, name, None)
        if isinstance(value, float):
            return value
    return (width // _head_count(attention)) ** -0.5


def _dropout(attention: nn.Module) -> float:
    """The attention-probability dropout of ``attention`` (0 in eval mode)."""
    if not attention.training:
        return 0.0
    for name in ("dropout", "attention_dropout", "dropout_prob", "attention_probs_dropout_prob"):
        value = getattr(attention, name, None)
        if isinstance(value, nn.Dropout):
            return value.p
        if isinstance(value, float):
            return value
    return 0.0


@dataclass(frozen=True)
class LayerKind:
    """How to recognise a layer, merge in it, and find its query and key projections."""

    classes: tuple[str, ...]
    mixin: type
    query: str
    key: str
    needs: tuple[str, ...]
    fused: bool = False  # query and key are the first two thirds of one ``qkv`` projection
    takes: str | None = None  # a parameter the layer's forward names (tells versions apart)

    def tap(self, runtime: Runtime, what: str) -> ProjectionTap:
        part = (0 if what == "queries" else 1) if self.fused else None
        return ProjectionTap(runtime, what, part)


LAYER_KINDS = (
    LayerKind(("ViTLayer", "DeiTLayer"), MergingPreNormLayer, "attention.q_proj",
              "attention.k_proj", ("layernorm_before", "attention", "layernorm_after", "mlp")),
    LayerKind(("ViTLayer", "DeiTLayer"), MergingViTOutputLayer, "attention.attention.query",
              "attention.attention.key",
              ("layernorm_before", "attention", "layernorm_after", "intermediate", "output")),
    LayerKind(("CLIPEncoderLayer", "SiglipEncoderLayer"), MergingPreNormLayer, "self_attn.q_proj",
              "self_attn.k_proj", ("layer_norm1", "self_attn", "layer_norm2", "mlp")),
    LayerKind(("BertLayer", "RobertaLayer"), MergingBertLayer, "attention.self.query",
              "attention.self.key", ("attention", "intermediate", "output")),
    LayerKind(("TransformerBlock",), MergingDistilBertMaskLayer, "attention.q_lin",
              "attention.k_lin", ("attention", "sa_layer_norm", "ffn", "output_layer_norm"),
              takes="attn_mask"),
    LayerKind(("TransformerBlock",), MergingDistilBertLayer, "attention.q_lin", "attention.k_lin",
              ("attention", "sa_layer_norm", "ffn", "output_layer_norm")),
    LayerKind(("BlipEncoderLayer",), MergingFusedQKVLayer, "self_attn.qkv", "self_attn.qkv",
              ("layer_norm1", "self_attn", "layer_norm2", "mlp"), fused=True),
)


@dataclass(frozen=True)
class Family:
    """A group of model classes that share layers, prefix tokens and reference settings."""

    name: str
    model_classes: tuple[str, ...]
    stack_paths: tuple[str, ...]
    num_prefix: int
    margin: MarginSpec
    merge_blocks: tuple[int, ...] | None = None
    presets: dict[str, str] = field(default_factory=dict)
    cross_attends: bool = False  # a text encoder cross-attends to the merged image tokens
    # The blocks whose output the model reads, when that depends on its config (LLaVA reads
    # one tower layer, so merging stops there); else every block, or ``merge_blocks``.
    read_blocks: Callable[[Any], tuple[int, ...]] | None = None
    # What the patched model needs besides merging layers (LLaVA: placeholder fitting).
    finish_patch: Callable[[nn.Module, Patch], None] | None = None


# Margins and text settings: docs/method.md §3 and §5 (the authors' reference values per family).
VISION_MARGIN = LinearMargin(0.75, 0.75)
CLIP_MARGIN = LinearMargin(0.9, 0.9)
TEXT_MARGIN = LinearMargin(0.9, 0.25)
TEXT_PRESETS = {"pitome": "pitome_text"}

FAMILIES = (
    Family("ViT", ("ViTModel", "ViTForImageClassification"),
           ("layers", "vit.layers", "encoder.layer", "vit.encoder.layer"), 1, VISION_MARGIN),
    Family("DeiT", ("DeiTModel", "DeiTForImageClassification",
                    "DeiTForImageClassificationWithTeacher"),
           ("layers", "deit.layers", "encoder.layer", "deit.encoder.layer"), 2, VISION_MARGIN),
    Family("CLIP vision", ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel"),
           ("vision_model.encoder.layers", "encoder.layers"), 1, CLIP_MARGIN),
    Family("SigLIP vision", ("SiglipVisionModel", "SiglipModel"),
           ("vision_model.encoder.layers", "encoder.layers"), 0, CLIP_MARGIN),
    Family("BLIP vision", ("BlipForImageTextRetrieval", "BlipVisionModel"),
           ("vision_model.encoder.layers", "encoder.layers"), 1, CLIP_MARGIN,
           cross_attends=True),
    Family("LLaVA vision tower", ("LlavaForConditionalGeneration",),
           ("model.vision_tower.encoder.layers", "vision_tower.encoder.layers",
            "model.vision_tower.vision_model.encoder.layers",
            "vision_tower.vision_model.encoder.layers"), 1, CLIP_MARGIN,
           read_blocks=llava.read_blocks, finish_patch=llava.fit_inside),
    Family("BERT", ("BertModel", "BertForSequenceClassification"),
           ("encoder.layer", "bert.encoder.layer"), 1, TEXT_MARGIN, (0, 1, 2), TEXT_PRESETS),
    Family("RoBERTa", ("RobertaModel", "RobertaForSequenceClassification"),
           ("encoder.layer", "roberta.encoder.layer"), 1, TEXT_MARGIN, (0, 1, 2), TEXT_PRESETS),
    Family("DistilBERT", ("DistilBertModel", "DistilBertForSequenceClassification"),
           ("transformer.layer", "distilbert.transformer.layer"), 1, TEXT_MARGIN, (0, 1, 2),
           TEXT_PRESETS),
)


class CrossAttentionSizes:
    """A pre-hook for BLIP's text encoder: cross-attention to merged image tokens gets the
    same ``log size`` key bias as self-attention (proportional attention)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        info = self.runtime.info()
        states = kwargs.get("encoder_hidden_states")
        mask = kwargs.get("encoder_attention_mask")
        if info is None or info.sizes is None or states is None or mask is None \
                or mask.dim() != 2 or info.sizes.shape[:2] != states.shape[:2]:
            return None  # not the image tokens of this model's last forward
        blocked = torch.finfo(states.dtype).min
        bias = torch.where(mask.bool(), info.sizes[..., 0].log(), blocked).to(states.dtype)
        return args, {**kwargs, "encoder_attention_mask": bias[:, None, None, :]}


class HeldCrossAttentionMask:
    """transformers 4.x: BLIP's text encoder takes only a 0/1 encoder mask, so a 4-D additive
    one (as :class:`CrossAttentionSizes` makes) is held back by :meth:`hold` and handed to
    every cross-attention module by :meth:`hand`."""

    def __init__(self) -> None:
        self._local = threading.local()  # one text forward per thread

    def hold(self, module: nn.Module, args: tuple, kwargs: dict):
        mask = kwargs.get("encoder_attention_mask")
        held = mask if mask is not None and mask.dim() == 4 else None
        self._local.mask = held
        if held is None:
            return None
        return args, {**kwargs, "encoder_attention_mask": None}

    def hand(self, module: nn.Module, args: tuple, kwargs: dict):
        held = getattr(self._local, "mask", None)
        if held is None:
            return None
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        name = "encoder_attention_mask" if "encoder_attention_mask" in bound.signature.parameters \
            else "attention_mask"
        bound.arguments[name] = held
        return bound.args, bound.kwargs

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()


def _attribute(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _forward_parameters(layer: nn.Module) -> set[str]:
    return set(inspect.signature(type(layer).forward).parameters)


def _layer_kind(layer: nn.Module) -> LayerKind | None:
    names = class_names(layer)
    for kind in LAYER_KINDS:
        if names & set(kind.classes) and all(hasattr(layer, part) for part in kind.needs) \
                and _attribute(layer, kind.key) is not None \
                and (kind.takes is None or kind.takes in _forward_parameters(layer)):
            return kind
    return None


def _heads(model: nn.Module, layer: nn.Module, kind: LayerKind) -> int:
    attention = _attribute(layer, kind.key.rsplit(".", 1)[0])
    value = _head_count(attention)
    if value is not None:
        return value
    config = getattr(attention, "config", None) or getattr(model, "config", None)
    for name in ("num_attention_heads", "n_heads"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise UnsupportedModelError(f"{type(layer).__name__} whose head count cannot be found",
                                supported_lines())


def image_tokens_in(model: nn.Module, num_prefix: int) -> int | None:
    """Tokens entering a vision tower's first layer at its configured image size (prefix
    included), or None for text models and configs without one."""
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None) or config
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if not isinstance(size, int) or not isinstance(patch, int) or patch <= 0:
        return None
    return (size // patch) ** 2 + num_prefix


def supported_lines() -> list[str]:
    return [f"Hugging Face {family.name}: {', '.join(family.model_classes)} ({TESTED})"
            for family in FAMILIES]


class HuggingFaceAdapter:
    name = "hf"
    supported = "\n  ".join(supported_lines())

    def family(self, model: nn.Module) -> Family | None:
        names = class_names(model)
        for family in FAMILIES:
            if names & set(family.model_classes):
                return family
        return None

    def matches(self, model: nn.Module) -> bool:
        return self.family(model) is not None

    def margin_for(self, model: nn.Module) -> MarginSpec:
        return self.family(model).margin  # type: ignore[union-attr]

    def merge_blocks_for(self, model: nn.Module,
                         per_block: bool = False) -> tuple[int, ...] | None:
        family = self.family(model)
        if family.read_blocks is not None:  # type: ignore[union-attr]
            return family.read_blocks(model.config)  # type: ignore[union-attr]
        return None if per_block else family.merge_blocks  # type: ignore[union-attr]

    def preset_for(self, model: nn.Module, algo: str) -> str:
        presets = self.family(model).presets  # type: ignore[union-attr]
        return presets.get(canonical_name(algo), algo)  # "PiToMe" is "pitome" here too

    def stack(self, model: nn.Module) -> nn.ModuleList:
        return self._stack_and_owner(model)[0]

    def _stack_and_owner(self, model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
        """The layer list, and the module whose forward loops over it."""
        family = self.family(model)
        for path in family.stack_paths:  # type: ignore[union-attr]
            layers = _attribute(model, path)
            if isinstance(layers, nn.ModuleList):
                owner_path = path.rpartition(".")[0]
                return layers, _attribute(model, owner_path) if owner_path else model
        raise UnsupportedModelError(
            f"{type(model).__name__} without its layer list at {' or '.join(family.stack_paths)} "
            f"(pitome is tested with {TESTED})", supported_lines())

    def check(self, model: nn.Module, layers: nn.ModuleList) -> list[LayerKind]:
        if hasattr(model, "_merge_input_ids_with_image_features"):
            raise UnsupportedModelError(
                f"{type(model).__name__} of transformers < 4.48, whose legacy expansion of image "
                f"placeholders cannot take merged image tokens (pitome is tested with {TESTED})",
                supported_lines())
        kinds = []
        for index, layer in enumerate(layers):
            kind = _layer_kind(layer)
            if kind is None:
                raise UnsupportedModelError(
                    f"{type(model).__name__} whose layer {index} is a {type(layer).__name__} "
                    f"with an unexpected structure (pitome is tested with {TESTED})",
                    supported_lines())
            kinds.append(kind)
        return kinds

    def patch(self, model: nn.Module, config: MergeConfig) -> Patch:
        family = self.family(model)
        layers, owner = self._stack_and_owner(model)
        kinds = self.check(model, layers)
        tokens = image_tokens_in(model, family.num_prefix)  # type: ignore[union-attr]
        if tokens is not None:  # an impossible schedule is refused now, not at the first image
            config.schedule.plan(tokens, family.num_prefix, len(layers))  # type: ignore[union-attr]
        runtime = Runtime(config, family.num_prefix, len(layers),  # type: ignore[union-attr]
                          _heads(model, layers[0], kinds[0]))
        patch = Patch(self.name, runtime)
        patch.hook(owner.register_forward_hook(runtime.end_forward, always_call=True))
        # transformers 4.x: layers that can output attentions return tuples
        returns_tuple = "output_attentions" in _forward_parameters(layers[0])
        for index, (layer, kind) in enumerate(zip(layers, kinds)):
            patch.hook(_attribute(layer, kind.key).register_forward_hook(
                kind.tap(runtime, "keys")))
            if config.algorithm.needs_attention:
                patch.hook(_attribute(layer, kind.query).register_forward_hook(
                    kind.tap(runtime, "queries")))
            patch.swap(layer, kind.mixin)
            patch.set(layer, RUNTIME_ATTR, runtime)
            patch.set(layer, INDEX_ATTR, index)
            patch.set(layer, TUPLE_ATTR, returns_tuple)
        text_encoder = getattr(model, "text_encoder", None)
        if family.cross_attends and text_encoder is not None and config.prop_attn:  # type: ignore[union-attr]
            patch.hook(text_encoder.register_forward_pre_hook(CrossAttentionSizes(runtime),
                                                              with_kwargs=True))
            text_layers = _attribute(text_encoder, "encoder.layer") or []
            if len(text_layers) and "output_attentions" in _forward_parameters(text_layers[0]):
                held = HeldCrossAttentionMask()
                patch.hook(text_encoder.register_forward_pre_hook(held.hold, with_kwargs=True))
                for layer in text_layers:
                    if hasattr(layer, "crossattention"):
                        patch.hook(layer.crossattention.register_forward_pre_hook(
                            held.hand, with_kwargs=True))
        if family.finish_patch is not None:  # type: ignore[union-attr]
            family.finish_patch(model, patch)  # type: ignore[union-attr]
        return patch

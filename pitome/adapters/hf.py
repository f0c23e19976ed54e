"""Hugging Face transformers 5.x: ViT, DeiT, CLIP and SigLIP vision towers, BERT, RoBERTa, DistilBERT.

Each patched layer composes the layer's own submodules (norms, the attention module, the
MLP) and merges between attention and MLP; the attention module is still the library's own,
dispatched through its attention-function interface (sdpa or eager), and receives pitome's
additive key bias (proportional attention, padding) as its attention mask. The merging
metric, the attention keys averaged over heads, is read by a forward hook on the key
projection, so no projection runs twice.

The model's own forward stays in charge: it loops over the layers and builds its output
classes; the layers hand one :class:`MergeState` from the first to the last through the
:class:`StackRun` they share. The first layer starts it (reading the padding from the mask
the model built), the last records :func:`pitome.merge_info` and lets it go.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.attention import received_attention
from ..core.schedule import LinearMargin, MarginSpec
from ..core.state import MergeConfig, MergeState
from .base import CONFIG_ATTR, INFO_ATTR, UnsupportedModelError, class_names, record_info, \
    restore_class, swap_class

RUN_ATTR = "_pitome_run"
TESTED = "transformers 5.24"


class StackRun:
    """What the patched layers of one stack share: the config and the live forward's state."""

    def __init__(self, owner: nn.Module, config: MergeConfig, num_prefix: int, heads: int,
                 num_layers: int) -> None:
        self.owner, self.config = owner, config
        self.num_prefix, self.heads, self.num_layers = num_prefix, heads, num_layers
        self.state: MergeState | None = None
        self.tokens_in = 0
        self.keys: torch.Tensor | None = None
        self.queries: torch.Tensor | None = None
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []

    def begin(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> MergeState:
        self.tokens_in = x.shape[1]
        self.state = MergeState(self.config, x, self.num_prefix, self.num_layers,
                                padding=real_tokens(attention_mask, x.shape[1]))
        return self.state

    def finish(self) -> None:
        if self.state is not None:
            record_info(self.owner, self.state.info(self.tokens_in))
        self.state = self.keys = self.queries = None

    def head_mean(self, projected: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = projected.shape
        return projected.view(batch, tokens, self.heads, width // self.heads).mean(dim=2)

    def received(self, bias: torch.Tensor | None, scale: float) -> torch.Tensor | None:
        if self.state is None or not self.state.needs_attention:
            return None
        batch, tokens, width = self.keys.shape  # type: ignore[union-attr]
        split = (batch, tokens, self.heads, width // self.heads)
        q = self.queries.view(split).transpose(1, 2)  # type: ignore[union-attr]
        k = self.keys.view(split).transpose(1, 2)  # type: ignore[union-attr]
        return received_attention(q, k, scale, bias, self.state)


def real_tokens(attention_mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """``B×T`` True for real tokens, from a 2-D 0/1 mask or a 4-D boolean or additive mask."""
    if attention_mask is None:
        return None
    mask = attention_mask
    if mask.dim() == 4:
        mask = mask[:, 0, 0, :]
    if mask.shape[-1] != tokens:
        raise ValueError(f"attention mask covers {mask.shape[-1]} tokens, the input has {tokens}")
    return mask.bool() if mask.dtype == torch.bool or mask.dim() == 2 and mask.max() <= 1 \
        else mask == 0


class MergingLayer:
    """Shared by every layer kind: start and end the forward's state, merge the residual."""

    def _pitome_enter(self, x: torch.Tensor, attention_mask: torch.Tensor | None
                      ) -> tuple[StackRun, MergeState]:
        run: StackRun = self.__dict__[RUN_ATTR]
        if self._pitome_index == 0 or run.state is None:
            run.begin(x, attention_mask)
        return run, run.state  # type: ignore[return-value]

    def _pitome_merge(self, run: StackRun, x: torch.Tensor, bias: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
        state = run.state
        metric = run.head_mean(run.keys) if state.config.metric == "keys" else x
        return state.merge(x, metric, self._pitome_index, run.received(bias, scale))

    def _pitome_exit(self, run: StackRun, x: torch.Tensor) -> torch.Tensor:
        if self._pitome_index == run.num_layers - 1:
            run.finish()
        return x


class MergingPreNormLayer(MergingLayer):
    """ViT/DeiT (``layernorm_before``…) and CLIP/SigLIP (``layer_norm1``…) pre-norm layers."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *args, **kwargs) -> torch.Tensor:
        run, state = self._pitome_enter(hidden_states, attention_mask)
        bias = state.attention_bias(hidden_states.dtype)
        norm1, attention, norm2 = self._pitome_parts()
        h, _ = attention(norm1(hidden_states), attention_mask=bias)
        dropout = getattr(self, "dropout", None)
        x = hidden_states + (dropout(h) if dropout is not None else h)
        x = self._pitome_merge(run, x, bias, attention.scaling if hasattr(attention, "scaling")
                               else attention.scale)
        h = self.mlp(norm2(x))
        x = x + (dropout(h) if dropout is not None else h)
        return self._pitome_exit(run, x)

    def _pitome_parts(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        if hasattr(self, "layernorm_before"):
            return self.layernorm_before, self.attention, self.layernorm_after
        return self.layer_norm1, self.self_attn, self.layer_norm2


class MergingBertLayer(MergingLayer):
    """BERT/RoBERTa post-norm layer: attention sub-block (with its residual norm), merge, FFN."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *args, **kwargs) -> torch.Tensor:
        run, state = self._pitome_enter(hidden_states, attention_mask)
        bias = state.attention_bias(hidden_states.dtype)
        x, _ = self.attention(hidden_states, bias)
        x = self._pitome_merge(run, x, bias, self.attention.self.scaling)
        return self._pitome_exit(run, self.feed_forward_chunk(x))


class MergingDistilBertLayer(MergingLayer):
    """DistilBERT's ``TransformerBlock``: attention, residual norm, merge, FFN, residual norm."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *args, **kwargs) -> torch.Tensor:
        run, state = self._pitome_enter(hidden_states, attention_mask)
        bias = state.attention_bias(hidden_states.dtype)
        h, _ = self.attention(hidden_states, attention_mask=bias)
        x = self.sa_layer_norm(h + hidden_states)
        x = self._pitome_merge(run, x, bias, self.attention.scaling)
        return self._pitome_exit(run, self.output_layer_norm(self.ffn(x) + x))


@dataclass(frozen=True)
class LayerKind:
    """How to recognise a layer, merge in it, and find its query and key projections."""

    classes: tuple[str, ...]
    mixin: type
    query: str
    key: str
    needs: tuple[str, ...]


LAYER_KINDS = (
    LayerKind(("ViTLayer", "DeiTLayer"), MergingPreNormLayer, "attention.q_proj",
              "attention.k_proj", ("layernorm_before", "attention", "layernorm_after", "mlp")),
    LayerKind(("CLIPEncoderLayer", "SiglipEncoderLayer"), MergingPreNormLayer, "self_attn.q_proj",
              "self_attn.k_proj", ("layer_norm1", "self_attn", "layer_norm2", "mlp")),
    LayerKind(("BertLayer", "RobertaLayer"), MergingBertLayer, "attention.self.query",
              "attention.self.key", ("attention", "intermediate", "output")),
    LayerKind(("TransformerBlock",), MergingDistilBertLayer, "attention.q_lin", "attention.k_lin",
              ("attention", "sa_layer_norm", "ffn", "output_layer_norm")),
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


# Margins and text settings: SPEC §3 and §5 (the authors' reference values per family).
VISION_MARGIN = LinearMargin(0.75, 0.75)
CLIP_MARGIN = LinearMargin(0.9, 0.9)
TEXT_MARGIN = LinearMargin(0.9, 0.25)
TEXT_PRESETS = {"pitome": "pitome_text"}

FAMILIES = (
    Family("ViT", ("ViTModel", "ViTForImageClassification"), ("layers", "vit.layers"), 1,
           VISION_MARGIN),
    Family("DeiT", ("DeiTModel", "DeiTForImageClassification",
                    "DeiTForImageClassificationWithTeacher"), ("layers", "deit.layers"), 2,
           VISION_MARGIN),
    Family("CLIP vision", ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel",
                           "CLIPForImageClassification"),
           ("vision_model.encoder.layers", "encoder.layers"), 1, CLIP_MARGIN),
    Family("SigLIP vision", ("SiglipVisionModel", "SiglipModel", "SiglipForImageClassification"),
           ("vision_model.encoder.layers", "encoder.layers"), 0, CLIP_MARGIN),
    Family("BERT", ("BertModel", "BertForSequenceClassification"),
           ("encoder.layer", "bert.encoder.layer"), 1, TEXT_MARGIN, (0, 1, 2), TEXT_PRESETS),
    Family("RoBERTa", ("RobertaModel", "RobertaForSequenceClassification"),
           ("encoder.layer", "roberta.encoder.layer"), 1, TEXT_MARGIN, (0, 1, 2), TEXT_PRESETS),
    Family("DistilBERT", ("DistilBertModel", "DistilBertForSequenceClassification"),
           ("transformer.layer", "distilbert.transformer.layer"), 1, TEXT_MARGIN, (0, 1, 2),
           TEXT_PRESETS),
)


def _attribute(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _layer_kind(layer: nn.Module) -> LayerKind | None:
    names = class_names(layer)
    for kind in LAYER_KINDS:
        if names & set(kind.classes) and all(hasattr(layer, part) for part in kind.needs) \
                and _attribute(layer, kind.key) is not None:
            return kind
    return None


def _heads(model: nn.Module, layer: nn.Module, kind: LayerKind) -> int:
    attention = _attribute(layer, kind.key.rsplit(".", 1)[0])
    for name in ("num_attention_heads", "num_heads", "n_heads"):
        value = getattr(attention, name, None)
        if isinstance(value, int):
            return value
    config = getattr(attention, "config", None) or getattr(model, "config", None)
    for name in ("num_attention_heads", "n_heads"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise UnsupportedModelError(f"{type(layer).__name__} whose head count cannot be found",
                                supported_lines())


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

    def merge_blocks_for(self, model: nn.Module) -> tuple[int, ...] | None:
        return self.family(model).merge_blocks  # type: ignore[union-attr]

    def preset_for(self, model: nn.Module, algo: str) -> str:
        return self.family(model).presets.get(algo, algo)  # type: ignore[union-attr]

    def stack(self, model: nn.Module) -> nn.ModuleList:
        family = self.family(model)
        for path in family.stack_paths:  # type: ignore[union-attr]
            layers = _attribute(model, path)
            if isinstance(layers, nn.ModuleList):
                return layers
        raise UnsupportedModelError(
            f"{type(model).__name__} without its layer list at {' or '.join(family.stack_paths)} "
            f"(pitome is tested with {TESTED})", supported_lines())

    def check(self, model: nn.Module, layers: nn.ModuleList) -> list[LayerKind]:
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

    def patch(self, model: nn.Module, config: MergeConfig) -> None:
        family = self.family(model)
        layers = self.stack(model)
        kinds = self.check(model, layers)
        run = StackRun(model, config, family.num_prefix,  # type: ignore[union-attr]
                       _heads(model, layers[0], kinds[0]), len(layers))
        needs_queries = getattr(config.algorithm, "needs_attention", False)
        for index, (layer, kind) in enumerate(zip(layers, kinds)):
            run.hooks.append(_attribute(layer, kind.key).register_forward_hook(
                lambda module, args, out: setattr(run, "keys", out)))
            if needs_queries:
                run.hooks.append(_attribute(layer, kind.query).register_forward_hook(
                    lambda module, args, out: setattr(run, "queries", out)))
            swap_class(layer, kind.mixin)
            layer.__dict__[RUN_ATTR] = run
            layer.__dict__["_pitome_index"] = index
        object.__setattr__(model, CONFIG_ATTR, config)

    def unpatch(self, model: nn.Module) -> None:
        layers = self.stack(model)
        run = layers[0].__dict__.get(RUN_ATTR) if len(layers) else None
        if run is not None:
            for hook in run.hooks:
                hook.remove()
        for layer in layers:
            restore_class(layer)
            layer.__dict__.pop(RUN_ATTR, None)
            layer.__dict__.pop("_pitome_index", None)
        for attr in (CONFIG_ATTR, INFO_ATTR):
            model.__dict__.pop(attr, None)


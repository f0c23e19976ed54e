"""LLaVA-1.5-7B end to end: time to first token, decode throughput and memory with fewer image
tokens.

LLaVA-1.5-7B's shapes with random weights built from configs (nothing downloads; speed and
memory do not depend on the weights): the CLIP ViT-L/14-336 tower (577 tokens, 576 image
tokens, features from its second-to-last layer) and Vicuna-7B (hidden 4096, 32 layers, 32
heads, intermediate 11008, vocabulary 32064), bf16 with SDPA on a GPU. Every prompt holds one
image and 40 text tokens; greedy ``generate`` makes exactly 32 new tokens. Prompts go in as
the processor makes them (576 placeholders): the patched model fits them itself.

Variants: ``none`` (unmerged), ``ALGO@RATIO`` (e.g. ``pitome@0.9``) and ``ALGO@Nt`` (e.g.
``visionzip@64t``: N image tokens). Modes: ``eager`` (dynamic KV cache, eager decoding),
``static`` (``cache_implementation="static"``, eager), ``compiled`` (static cache and
transformers' compiled decoding step, CUDA graphs; each variant and batch compiles once, in
the warm-up round) and ``decoder`` (:class:`pitome.generation.GreedyDecoder`: a static
cache, the decoding step and its argmax compiled into CUDA graphs, no wait for the GPU
between tokens; one decoder per variant, compiled in the warm-up). Variants take turns in every round (one process, interleaved, each
round starting with the next variant); each keeps its own static cache between its turns,
as a user generating again would, so compiled decoding replays its CUDA graphs rather than
re-recording them for a new cache. The table reports medians over the measured rounds.
Rounds stop early at ``--time-limit`` so the run fits one GPU call; the JSON is rewritten
after every measured generate.

Measured per row: time to first token (the prefill, until the first logits are ready), decode
tokens/s (the other 31 tokens of every prompt), end-to-end generate time, the KV cache
(bytes of the cache's tensors after generate; its image part: image tokens × bytes per
token) and peak GPU memory during generate (weights included).

    python benchmarks/llava.py --modes eager --json docs/llava-h200-eager.json
    python benchmarks/llava.py --capture-tower --modes eager --batches 8   # towers replayed
    python benchmarks/llava.py --tiny          # CPU smoke run in seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import pitome
from pitome.adapters.llava import STATIC_CACHE_MEMORY
from pitome.generation import GreedyDecoder
from pitome.llava import capture_vision_tower, forget_static_cache, image_tokens

RATIO_VARIANTS = ["pitome@0.9", "pitome@0.95", "tome@0.9", "tome@0.95"]
COUNT_VARIANTS = [f"{algo}@{count}t" for count in (64, 128, 192)
                  for algo in ("pitome", "tome", "visionzip")]
DEFAULT_VARIANTS = ["none", *RATIO_VARIANTS, *COUNT_VARIANTS]
MODES = ("eager", "static", "compiled", "decoder")
IMAGE_TOKEN = 32000


@dataclass(frozen=True)
class Variant:
    """A way to run the model: unmerged, or an algorithm at a ratio or an image-token count."""

    name: str
    algo: str | None = None
    ratio: float | None = None
    tokens: int | None = None

    @classmethod
    def parse(cls, text: str) -> Variant:
        if text == "none":
            return cls(text)
        algo, _, amount = text.partition("@")
        if not amount:
            raise ValueError(f"variant {text!r}: write none, ALGO@RATIO or ALGO@Nt")
        if amount.endswith("t"):
            return cls(text, algo, tokens=int(amount[:-1]))
        return cls(text, algo, ratio=float(amount))

    def apply(self, model: torch.nn.Module, caches: StaticCaches) -> None:
        caches.put_away(model)
        if self.algo is None:
            pitome.unpatch(model)
        else:
            pitome.patch(model, self.algo, ratio=self.ratio, tokens=self.tokens)
        caches.bring_back(model, self.name)


class StaticCaches:
    """Each variant's static KV cache, kept while other variants run.

    A user generating again with the same model reuses its static cache (transformers keeps
    it, or its length, on the model), so a compiled decoding step replays the CUDA graphs it
    recorded. Switching variants would otherwise hand every generate a freshly allocated
    cache: new addresses, graphs re-recorded inside the timed decode. Each variant gets its
    own cache back instead, sized to its own prompt.
    """

    def __init__(self) -> None:
        self.kept: dict[str, dict] = {}
        self.current: str | None = None

    def put_away(self, model: torch.nn.Module) -> None:
        memory = {name: model.__dict__.pop(name) for name in STATIC_CACHE_MEMORY
                  if name in model.__dict__}
        if self.current is not None:
            self.kept[self.current] = memory

    def bring_back(self, model: torch.nn.Module, name: str) -> None:
        forget_static_cache(model)
        model.__dict__.update(self.kept.pop(name, {}))
        self.current = name

    def held_bytes(self) -> int:
        """Bytes of the caches kept for the variants not running (left out of peak memory)."""
        return sum(cache_bytes(memory.get("_cache")) or 0 for memory in self.kept.values())


def llava_config(tiny: bool):
    import transformers

    if tiny:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=2, image_size=128, patch_size=8)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, vocab_size=32064)
    else:
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**vision),
        text_config=transformers.LlamaConfig(**text, max_position_embeddings=4096,
                                             pad_token_id=0),
        image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config._attn_implementation = "sdpa"
    return config


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model with random weights, made directly on ``device`` in ``dtype``."""
    import transformers

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = transformers.LlavaForConditionalGeneration(llava_config(tiny))
    finally:
        torch.set_default_dtype(default)
    model.to(dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: always the full 32 tokens
    model.generation_config.pad_token_id = 0
    return model


def prompts(model, batch: int, text_tokens: int, device: torch.device,
            dtype: torch.dtype) -> dict:
    """``batch`` prompts as a LLaVA processor makes them: BOS, the unmerged count of image
    placeholders, then text."""
    vision = model.config.vision_config
    placeholders = (vision.image_size // vision.patch_size) ** 2
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(2, IMAGE_TOKEN, (batch, text_tokens - 1), generator=generator)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long),
                     torch.full((batch, placeholders), IMAGE_TOKEN), text], dim=1)
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype)}


class FirstToken:
    """A logits processor that notes when the first logits are ready (the prefill's end)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.at = device, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            synchronize(self.device)
            self.at = time.perf_counter()
        return scores


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(output) -> int | None:
    """Bytes held by the KV cache ``generate`` returned, or by a cache itself (None where
    it cannot be read)."""
    cache = getattr(output, "past_key_values", None) or getattr(output, "cache", None) \
        or output
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def bytes_per_token(model) -> int:
    """KV-cache bytes one token costs across the language model's layers."""
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = next(model.parameters()).element_size()
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * element


def generate_once(model, inputs: dict, mode: str, new_tokens: int,
                  device: torch.device, held_bytes: int = 0) -> dict:
    """One timed ``generate``; ``held_bytes`` of GPU memory belong to other variants and are
    left out of its peak."""
    from transformers import LogitsProcessorList

    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   return_dict_in_generate=True)
    if mode != "eager":
        options.update(cache_implementation="static", disable_compile=mode != "compiled")
    first = FirstToken(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, **options,
                                logits_processor=LogitsProcessorList([first]))
    synchronize(device)
    end = time.perf_counter()
    batch = inputs["input_ids"].shape[0]
    made = output.sequences.shape[1] - inputs["input_ids"].shape[1]
    if made != new_tokens:
        raise RuntimeError(f"generate made {made} tokens, not {new_tokens}")
    return {"ttft_ms": 1e3 * (first.at - start), "e2e_ms": 1e3 * (end - start),
            "decode_tokens_per_s": batch * (new_tokens - 1) / max(end - first.at, 1e-9),
            "kv_cache_mb": _mb(cache_bytes(output)),
            "peak_gb": (torch.cuda.max_memory_allocated(device) - held_bytes) / 2 ** 30
            if device.type == "cuda" else None}


def decode_once(decoder: GreedyDecoder, inputs: dict, new_tokens: int,
                device: torch.device, held_bytes: int = 0) -> dict:
    """One timed prefill and decoding by ``decoder`` (every row makes ``new_tokens``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    decoding = decoder.prefill(new_tokens, **inputs)
    synchronize(device)
    first = time.perf_counter()
    output = decoder.decode(decoding, ignore_eos=True)
    synchronize(device)
    end = time.perf_counter()
    batch = inputs["input_ids"].shape[0]
    made = output.shape[1] - inputs["input_ids"].shape[1]
    if made != new_tokens:
        raise RuntimeError(f"the decoder made {made} tokens, not {new_tokens}")
    return {"ttft_ms": 1e3 * (first - start), "e2e_ms": 1e3 * (end - start),
            "decode_tokens_per_s": batch * (new_tokens - 1) / max(end - first, 1e-9),
            "kv_cache_mb": _mb(cache_bytes(decoder._cache)),
            "peak_gb": (torch.cuda.max_memory_allocated(device) - held_bytes) / 2 ** 30
            if device.type == "cuda" else None}


class Decoders:
    """One :class:`GreedyDecoder` per variant and batch, its static cache and compiled step
    kept between turns (as a user decoding again with the same shapes would)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.kept = model, {}

    def get(self, name: str, batch: int) -> GreedyDecoder:
        if (name, batch) not in self.kept:
            self.kept[name, batch] = GreedyDecoder(self.model)
        return self.kept[name, batch]

    def held_bytes(self, running: tuple[str, int] | None = None) -> int:
        """Bytes of the caches of the decoders not running (left out of peak memory)."""
        return sum(cache_bytes(decoder._cache) or 0 for key, decoder in self.kept.items()
                   if key != running and decoder._cache is not None)


def capture_tower(model, inputs: dict) -> None:
    """Replay ``model``'s vision tower as a CUDA graph and capture it for this variant with an
    untimed one-token generate (the graph belongs to this patch, so every turn of a variant,
    patched anew, captures again; only the current one is kept)."""
    capture_vision_tower(model, max_graphs=1)
    with torch.no_grad():  # a dynamic cache: the variant's static one stays as it was
        model.generate(**inputs, max_new_tokens=1, do_sample=False)


def rotated(variants: list[Variant], round_index: int) -> list[Variant]:
    """The variants in the order round ``round_index`` runs them: each round starts one
    later, so no variant always follows the same one (whose memory it inherits)."""
    shift = round_index % len(variants)
    return variants[shift:] + variants[:shift]


def _mb(value: int | None) -> float | None:
    return None if value is None else value / 2 ** 20


def median_row(samples: list[dict]) -> dict:
    row = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples if sample[key] is not None]
        row[key] = statistics.median(values) if values else None
    return row


def summary(samples: dict[tuple, list[dict]], tokens: dict[str, int],
            per_token: int) -> list[dict]:
    """One row per mode, batch and variant: medians of its samples."""
    return [{"mode": mode, "batch": batch, "variant": name, "image_tokens": tokens[name],
             "rounds": len(found), "image_kv_mb": batch * tokens[name] * per_token / 2 ** 20,
             **median_row(found)}
            for (mode, batch, name), found in samples.items()]


def table(rows: list[dict]) -> str:
    header = ("mode", "batch", "variant", "img tok", "TTFT ms", "TTFT x", "decode tok/s",
              "decode x", "e2e ms", "e2e x", "img KV MB", "KV MB", "peak GB")
    base = {(row["mode"], row["batch"]): row for row in rows if row["variant"] == "none"}

    def speedup(row: dict, key: str, higher: bool) -> str:
        ref = base.get((row["mode"], row["batch"]))
        if ref is None or not row[key] or not ref[key]:
            return "-"
        return f"{(row[key] / ref[key]) if higher else (ref[key] / row[key]):.2f}"

    def number(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = (row["mode"], str(row["batch"]), row["variant"], str(row["image_tokens"]),
                 number(row["ttft_ms"], ".1f"), speedup(row, "ttft_ms", False),
                 number(row["decode_tokens_per_s"], ".0f"),
                 speedup(row, "decode_tokens_per_s", True), number(row["e2e_ms"], ".0f"),
                 speedup(row, "e2e_ms", False), number(row["image_kv_mb"], ".1f"),
                 number(row["kv_cache_mb"], ".1f"), number(row["peak_gb"], ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def output_path(requested: str | None) -> Path:
    if requested is not None:
        path = Path(requested)
        if path.exists():
            sys.exit(f"{path} exists; give another --json path (results are never overwritten)")
        return path
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(f"llava-bench-{stamp}.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny LLaVA on the CPU in fp32: checks the script in seconds")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated: none, ALGO@RATIO, ALGO@Nt (default: %(default)s)")
    parser.add_argument("--batches", default=None,
                        help="comma-separated (default 1,8,32; tiny 1,2)")
    parser.add_argument("--modes", default=None,
                        help="comma-separated of eager, static, compiled, decoder (default "
                             "eager,static; compiled and decoder compile once per variant and "
                             "batch, in the warm-up)")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--text-tokens", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=None, help="default 32 (tiny 4)")
    parser.add_argument("--time-limit", type=float, default=540.0,
                        help="start no new round after this many seconds (default %(default)s)")
    parser.add_argument("--capture-tower", action="store_true",
                        help="every variant's vision tower replayed as CUDA graphs "
                             "(pitome.llava.capture_vision_tower), captured before timing")
    parser.add_argument("--json", help="write the results here (refuses an existing file; "
                                       "default llava-bench-TIMESTAMP.json)")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in (args.batches or ("1,2" if args.tiny else "1,8,32")).split(",")]
    args.modes = (args.modes or "eager,static").split(",")
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"--modes {unknown}: choose from {', '.join(MODES)}")
    args.rounds = args.rounds if args.rounds is not None else (1 if args.tiny else 3)
    args.new_tokens = args.new_tokens or (4 if args.tiny else 32)
    try:
        args.variants = [Variant.parse(text) for text in args.variants.split(",")]
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if "compiled" in args.modes and device.type != "cuda":
        print("compiled mode needs a GPU (transformers compiles decoding only there); skipped",
              file=sys.stderr)
        args.modes = [mode for mode in args.modes if mode != "compiled"]
    if {"compiled", "decoder"} & set(args.modes):
        import torch._dynamo as dynamo

        for name in ("recompile_limit", "cache_size_limit"):  # one graph per variant and batch
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, 256)
    path = output_path(args.json)
    started = time.perf_counter()
    model = build_model(args.tiny, device, dtype)
    print(f"built {'tiny ' if args.tiny else ''}LLaVA on {device} ({dtype}) in "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    per_token = bytes_per_token(model)
    inputs = {batch: prompts(model, batch, args.text_tokens, device, dtype)
              for batch in args.batches}
    caches = StaticCaches()
    decoders = Decoders(model)
    tokens = {}
    for variant in args.variants:
        variant.apply(model, caches)
        tokens[variant.name] = image_tokens(model)
    samples: dict[tuple, list[dict]] = {}
    environment = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or "cpu", "dtype": str(dtype),
                   "torch": torch.__version__,
                   "transformers": __import__("transformers").__version__,
                   "python": platform.python_version(), "tiny": args.tiny,
                   "text_tokens": args.text_tokens, "new_tokens": args.new_tokens,
                   "vision_tower": "CUDA graphs" if args.capture_tower else "eager",
                   "command": " ".join(sys.argv)}
    rows: list[dict] = []
    total = args.warmup + args.rounds
    last_round = 0.0
    for round_index in range(total):
        elapsed = time.perf_counter() - started
        if round_index > args.warmup and elapsed + last_round > args.time_limit:
            print(f"time limit: stopping after {round_index - args.warmup} measured rounds "
                  f"(another would end past {args.time_limit:.0f} s)", file=sys.stderr,
                  flush=True)
            break
        measured = round_index >= args.warmup
        for batch in args.batches:
            for mode in list(args.modes):
                for variant in rotated(args.variants, round_index):
                    if mode not in args.modes:
                        break
                    variant.apply(model, caches)
                    if args.capture_tower:
                        capture_tower(model, inputs[batch])
                    held = caches.held_bytes() + decoders.held_bytes((variant.name, batch))
                    try:
                        if mode == "decoder":
                            sample = decode_once(decoders.get(variant.name, batch), inputs[batch],
                                                 args.new_tokens, device, held)
                        else:
                            sample = generate_once(model, inputs[batch], mode, args.new_tokens,
                                                   device, held)
                    except Exception as error:  # noqa: BLE001 - one mode failing keeps the rest
                        if mode == "eager":
                            raise
                        print(f"{mode} mode failed ({type(error).__name__}: {error}); "
                              "dropped", file=sys.stderr, flush=True)
                        args.modes.remove(mode)
                        continue
                    if measured:  # written as it comes, so a run cut short keeps its rows
                        samples.setdefault((mode, batch, variant.name), []).append(sample)
                        rows = summary(samples, tokens, per_token)
                        path.write_text(json.dumps({"environment": environment, "rows": rows},
                                                   indent=1))
                    print(f"round {round_index + 1}/{total}{'' if measured else ' (warm-up)'} "
                          f"{mode} batch {batch} {variant.name}: TTFT {sample['ttft_ms']:.1f} ms, "
                          f"e2e {sample['e2e_ms']:.0f} ms [{time.perf_counter() - started:.0f} s]",
                          file=sys.stderr, flush=True)
        last_round = time.perf_counter() - started - elapsed
    pitome.unpatch(model)
    print(table(rows))
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

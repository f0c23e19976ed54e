"""Visual question answering with LLaVA-1.5: exact match, or option letters for multiple choice."""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._optional import require

LETTERS = string.ascii_uppercase
ARTICLES = {"a", "an", "the"}


@dataclass(frozen=True)
class Question:
    image: Path
    question: str
    answer: str
    choices: tuple[str, ...] = ()


def read_questions(path: str | Path, image_root: str | Path | None = None,
                   limit: int | None = None) -> list[Question]:
    """One JSON object per line: ``image``, ``question``, ``answer`` and optional ``choices``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no questions file at {path}")
    root = Path(image_root) if image_root is not None else path.parent
    questions = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            questions.append(Question(root / entry["image"], entry["question"],
                                      str(entry["answer"]), tuple(entry.get("choices", ()))))
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{path}:{number}: need image, question and answer "
                             f"({type(error).__name__}: {error})") from error
    return questions[:limit] if limit is not None else questions


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (VQA-style exact match)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(word for word in text.split() if word not in ARTICLES)


def option_letter(text: str, count: int) -> str | None:
    """The option letter a reply starts with ("B", "(B)", "B. blue", "Answer: B")."""
    allowed = LETTERS[:count]
    match = re.search(rf"(?:^|[\s(:])([{allowed}])(?:$|[\s).:,])", text.strip())
    return match.group(1) if match else None


def correct(question: Question, reply: str) -> bool:
    """Exact match for open questions; the chosen option for multiple choice, where the
    answer may be given as a letter, a 0-based index or the option's text."""
    if not question.choices:
        return normalize_answer(reply) == normalize_answer(question.answer)
    answer = question.answer.strip()
    if answer.isdigit():
        answer = LETTERS[int(answer)]
    elif answer not in LETTERS[:len(question.choices)]:
        answer = LETTERS[[normalize_answer(c) for c in question.choices].index(
            normalize_answer(answer))]
    return option_letter(reply, len(question.choices)) == answer


def prompt(question: Question) -> str:
    """LLaVA-1.5's conversation format; options listed as in its ScienceQA evaluation."""
    text = question.question
    if question.choices:
        options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(question.choices))
        text += f"\n{options}\nAnswer with the option's letter from the given choices directly."
    else:
        text += "\nAnswer the question using a single word or phrase."
    return f"USER: <image>\n{text} ASSISTANT:"


class VQAEvaluation:
    """Accuracy of LLaVA with its vision tower merged, per cell; reports the image tokens the
    language model saw.

    Prompts go to the model as the processor makes them (a patched model fits the image
    placeholders itself). On a GPU answers are generated with a static KV cache sized to
    each batch's prompt; with ``compiled`` by :class:`pitome.generation.GreedyDecoder` (the
    decoding step compiled into CUDA graphs, no wait for the GPU between tokens, caches
    rounded up to 64 tokens so nearby prompt lengths share a compiled step); elsewhere with
    the dynamic cache. On a
    GPU the vision tower is replayed as CUDA graphs (``capture_tower``; see
    :func:`pitome.llava.capture_vision_tower`), captured anew for every cell.
    """

    columns = (("accuracy", "accuracy %", ".2f"), ("image_tokens", "image tokens", "d"),
               ("gflops", "GFLOPs", ".1f"), ("examples_per_second", "q/s", ".2f"),
               ("examples", "questions", "d"))
    metric, metric_label = "accuracy", "accuracy (%)"

    def __init__(self, model: nn.Module, processor, questions: list[Question], processes,
                 batch_size: int = 8, max_new_tokens: int = 16, dtype: torch.dtype | None = None,
                 title: str = "", setup: dict | None = None, compiled: bool = False,
                 capture_tower: bool = True) -> None:
        if not hasattr(model, "generate") or not hasattr(model.config, "image_token_id"):
            raise ValueError(f"{type(model).__name__} is not a LLaVA-style generator")
        processor.tokenizer.padding_side = "left"
        self.model, self.processor, self.questions = model, processor, questions
        self.processes, self.batch_size = processes, batch_size
        self.max_new_tokens, self.dtype = max_new_tokens, dtype
        self.compiled = compiled
        self.decoder = None
        if compiled and processes.device.type == "cuda":
            from ..generation import GreedyDecoder

            self.decoder = GreedyDecoder(model, cache_multiple=64)
        self.capture_tower = capture_tower and processes.device.type == "cuda"
        self.title, self.setup = title, {
            "questions": len(questions), **(setup or {}),
            "vision_tower": "CUDA graphs" if self.capture_tower else "eager"}

    def _inputs(self, questions: list[Question]) -> tuple[dict | None, list[bool]]:
        from .runner import read_pictures

        pictures, readable = read_pictures([question.image for question in questions])
        if not pictures:
            return None, readable
        texts = [prompt(q) for q, ok in zip(questions, readable) if ok]
        inputs = self.processor(images=pictures, text=texts, padding=True, return_tensors="pt")
        device = self.processes.device
        inputs = {key: value.to(device) for key, value in inputs.items()}
        if self.dtype is not None:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs, readable

    def generation_options(self) -> dict:
        """``generate`` options where there is no :attr:`decoder`: greedy; a static cache
        on a GPU."""
        options = dict(max_new_tokens=self.max_new_tokens, do_sample=False)
        if self.processes.device.type == "cuda":
            options.update(cache_implementation="static", disable_compile=True)
        return options

    def _answer(self, inputs: dict) -> list[str]:
        with torch.no_grad():
            output = self.model.generate(**inputs, **self.generation_options()) \
                if self.decoder is None else self.decoder.generate(self.max_new_tokens,
                                                                    **inputs)
        new = output[:, inputs["input_ids"].shape[1]:]
        return self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)

    def __call__(self, cell) -> dict:
        from ..llava import capture_vision_tower, forget_static_cache, image_tokens
        from ..analysis.flops import counted_flops
        from .runner import apply_cell, evaluate_shard

        apply_cell(self.model, cell)
        forget_static_cache(self.model)  # a cell's static cache fits its own prompts
        if self.capture_tower:
            capture_vision_tower(self.model)
        result = evaluate_shard(self.processes, self.questions, self.batch_size, cell.key,
                                self._step)
        if result is None:
            return {}
        records = result.records
        example = {key: value.to(self.processes.device) for key, value in result.example.items()}
        return {"accuracy": 100.0 * sum(record[2] for record in records) / len(records),
                "image_tokens": image_tokens(self.model),
                "gflops": counted_flops(self.model, example) / 2e9,
                "examples_per_second": result.examples_per_second, "examples": len(records),
                "skipped": len(result.skipped), "replies": [record[1] for record in records[:20]]}

    def _step(self, indices: list[int], stopwatch):
        from .runner import Batch

        questions = [self.questions[i] for i in indices]
        inputs, readable = self._inputs(questions)
        skipped = [str(q.image) for q, ok in zip(questions, readable) if not ok]
        if inputs is None:
            return Batch([], skipped)
        replies = stopwatch(lambda: self._answer(inputs), sum(readable))
        kept = [index for index, ok in zip(indices, readable) if ok]
        example = {key: value[:1].cpu() for key, value in inputs.items()}
        return Batch([(index, reply, correct(self.questions[index], reply))
                      for index, reply in zip(kept, replies)], skipped, example)


def build_vqa_evaluation(args, processes, dtype) -> VQAEvaluation:
    """The ``pitome eval vqa`` task from its command-line arguments."""
    transformers = require("transformers", "hf")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        args.model, dtype=dtype or torch.float32).to(processes.device).eval()
    processor = transformers.AutoProcessor.from_pretrained(args.model)
    questions = read_questions(args.data, args.images, args.limit)
    title = (f"{args.model} on {len(questions)} questions of {Path(args.data).name}; GFLOPs = "
             "multiply-accumulates of the first question's prompt pass")
    return VQAEvaluation(model, processor, questions, processes, args.batch_size,
                         args.max_new_tokens, dtype, title,
                         {"max_new_tokens": args.max_new_tokens, "compile": args.compile},
                         compiled=args.compile, capture_tower=not args.eager_tower)

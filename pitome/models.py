"""Building models for the CLI, benchmarks and tests (timm is an optional dependency)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ._optional import require

RANDOM_WEIGHTS_SEED = 0


def create_timm_model(name: str, checkpoint: str | Path | None = None,
                      pretrained: bool = False) -> nn.Module:
    """A timm model in eval mode, float32.

    Random weights unless ``checkpoint`` (a ``.safetensors`` or torch file holding a state
    dict) or ``pretrained=True`` (downloads from the Hugging Face hub) says otherwise. Random
    weights come from a fixed seed, so every process (e.g. each rank of a distributed
    evaluation) builds the same model; the caller's random state is left as it was.
    """
    timm = require("timm", "timm")
    if checkpoint is not None and pretrained:
        raise ValueError("give either a checkpoint file or pretrained=True, not both")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model = timm.create_model(name, pretrained=pretrained)
    if checkpoint is not None:
        state = load_state_dict(checkpoint)
        missing, unexpected = model.state_dict().keys() - state, state.keys() - model.state_dict()
        if missing or unexpected:
            raise ValueError(f"checkpoint {checkpoint} does not fit {name}: "
                             f"{_some(missing, 'missing')}{_some(unexpected, 'unexpected')}"
                             .rstrip("; "))
        model.load_state_dict(state)
    return model.float().eval()


def _some(keys, what: str, shown: int = 3) -> str:
    if not keys:
        return ""
    names = ", ".join(sorted(keys)[:shown]) + (", ..." if len(keys) > shown else "")
    return f"{len(keys)} {what} key(s) ({names}); "


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        safetensors_torch = require("safetensors.torch", "timm")
        try:
            state = safetensors_torch.load_file(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError
            raise ValueError(f"checkpoint {path} is not a readable .safetensors file "
                             f"({error})") from error
    else:
        import pickle

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"checkpoint {path} is not a plain state dict that loads without running code "
                f"({first}); save weights with torch.save(model.state_dict(), path) or as "
                ".safetensors") from error
        if isinstance(state, dict):
            state = state.get("state_dict", state.get("model", state))
        if not isinstance(state, dict) or not all(
                isinstance(value, torch.Tensor) for value in state.values()):
            raise ValueError(f"checkpoint {path} holds {type(state).__name__}, not a state dict "
                             "of tensors")
    return {key: value.float() if value.is_floating_point() else value
            for key, value in state.items()}

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
        model.load_state_dict(load_state_dict(checkpoint))
    return model.float().eval()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        safetensors_torch = require("safetensors.torch", "timm")
        state = safetensors_torch.load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    return {key: value.float() if value.is_floating_point() else value
            for key, value in state.items()}

"""Merging never holds more memory than the unpatched model: the peak of live tensor bytes
during a forward, tracked op by op (so it runs on a CPU), at ViT-B's width.

On a GPU ``tests/test_gpu_families.py`` checks the allocator's own peak the same way; its
model builders serve both.
"""

from __future__ import annotations

import weakref
from functools import partial

import pytest
import torch
from test_gpu_families import FAMILIES as VISION_FAMILIES, VIT_B
from torch.utils._python_dispatch import TorchDispatchMode

import pitome

timm = pytest.importorskip("timm")


class LiveBytes(TorchDispatchMode):
    """The most bytes of tensor storage alive at once while the mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and not tensor._is_view():
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.sizes:
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)


def timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(embed_dim=768, depth=3, num_heads=12), lambda m, x: m(x)


FAMILIES = {"timm": timm_vit,
            **{name: partial(build, **VIT_B) for name, build in VISION_FAMILIES.items()}}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_merged_forward_holds_no_more_than_the_unpatched_one(name):
    torch.manual_seed(0)
    model, run = FAMILIES[name]()
    model.eval()
    x = torch.randn(8, 3, 224, 224)

    def peak() -> int:
        with torch.inference_mode(), LiveBytes() as tracker:
            run(model, x)
        return tracker.peak

    unpatched = peak()
    for algo in ("pitome", "tome", "pitome_paper"):
        pitome.patch(model, algo=algo, ratio=0.9)
        assert peak() <= unpatched, algo

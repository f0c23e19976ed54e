"""Planning ahead on a side stream: where it applies and how it is switched off.

Its effect on a GPU (the same plans and outputs as planning in series, also replayed as a
CUDA graph) is checked in ``tests/test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build, images

import pitome
from pitome.runtime.overlap import plan_ahead_enabled


def test_plans_run_in_series_on_cpu():
    assert not plan_ahead_enabled(torch.zeros(1))
    model = build("vit")
    pitome.patch(model, ratio=0.8)
    with torch.no_grad():
        model(images(2))
    assert pitome.merge_info(model).merges[0] > 0


def test_plan_ahead_setting_is_validated(monkeypatch):
    monkeypatch.setenv("PITOME_PLAN_AHEAD", "sometimes")
    with pytest.raises(ValueError, match="PITOME_PLAN_AHEAD must be one of auto, on, off"):
        plan_ahead_enabled(torch.zeros(1))


def test_plans_run_ahead_only_while_a_graph_is_captured_unless_asked(monkeypatch):
    cuda_keys = torch.zeros(1, device="meta")  # stands in for a CUDA tensor below
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    for capturing, mode, expected in [(False, "auto", False), (True, "auto", True),
                                      (False, "on", True), (True, "off", False)]:
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
        monkeypatch.setenv("PITOME_PLAN_AHEAD", mode)
        assert plan_ahead_enabled(cuda_keys) is expected, (capturing, mode)

"""A module's forward replayed as CUDA graphs per input shape (pitome.cuda_graph.ShapeGraphs):
eager wherever a graph would be unsafe, copies and pickles without graphs, replays what it
computes eagerly on a GPU."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from pitome.cuda_graph import ShapeGraphs, capture_forward, release_forward


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((4,), 2.0))

    def forward(self, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        return x * self.weight + shift


def test_capture_and_release_leave_an_ordinary_module():
    module = capture_forward(Scale())
    assert isinstance(module.__dict__["forward"], ShapeGraphs)
    assert capture_forward(module).forward is module.forward  # once only
    with torch.no_grad():
        torch.testing.assert_close(module(torch.ones(2, 4), shift=1.0), torch.full((2, 4), 3.0))
    assert not module.forward.graphs  # a CPU call runs eagerly
    for twin in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert isinstance(twin.__dict__["forward"], ShapeGraphs)
        assert twin.forward.forward.__self__ is twin and not twin.forward.graphs
        with torch.no_grad():
            torch.testing.assert_close(twin(torch.ones(1, 4)), torch.full((1, 4), 2.0))
    release_forward(module)
    assert "forward" not in module.__dict__
    with pytest.raises(ValueError, match="max_graphs must be at least 1, got 0"):
        capture_forward(Scale(), max_graphs=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_each_shape_is_captured_once_and_unsafe_calls_run_eagerly():
    module = capture_forward(Scale().cuda().eval(), max_graphs=2)  # training runs eagerly
    graphs = module.forward.graphs
    x = torch.randn(3, 4, device="cuda")
    with torch.no_grad():
        first = module(x).clone()
        torch.testing.assert_close(module(x + 1), (x + 1) * 2)  # replayed on new values
        torch.testing.assert_close(first, x * 2)
        assert len(graphs) == 1
        module(x, shift=1.0)
        module(torch.randn(5, 4, device="cuda"))
        assert len(graphs) == 2  # the least recently used one went
    out = module(x)  # gradients on: eager, and differentiable
    assert out.requires_grad and len(graphs) == 2
    module.train()
    with torch.no_grad():
        module(torch.randn(7, 4, device="cuda"))
    assert len(graphs) == 2


def test_graphs_wait_for_inference_in_eval_mode_with_nobody_watching():
    from torch.utils.flop_counter import FlopCounterMode

    module = capture_forward(Scale().eval())
    graphs = module.forward
    assert graphs.must_run_eagerly()  # gradients on
    with torch.no_grad():
        assert not graphs.must_run_eagerly()
        with FlopCounterMode(display=False):  # a replay would hide every operator from it
            assert graphs.must_run_eagerly()
        module.train()
        assert graphs.must_run_eagerly()

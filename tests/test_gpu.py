"""On a CUDA device: the GPU merges exactly what the CPU merges, and CUDA graphs replay it.

Skipped without CUDA (CI here has none); run on a GPU machine with ``pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build, images

import pitome
from pitome.runtime.state import MergeState
from pitome.cuda_graph import CudaGraphForward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ALGOS = ["pitome", "tome", "pitome_paper"]


@pytest.mark.parametrize("algo", ALGOS)
def test_gpu_plans_equal_cpu_plans(variant, algo):
    cpu = build(variant)
    gpu = build(variant).cuda()
    x = images(4)
    for model in (cpu, gpu):
        pitome.patch(model, algo=algo, ratio=0.8, keep_plans=True, trace_source=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        expected = cpu(x)
        actual = gpu(x.cuda())
    torch.testing.assert_close(actual.cpu(), expected, atol=1e-4, rtol=1e-4)
    cpu_plans, gpu_plans = pitome.merge_info(cpu).plans, pitome.merge_info(gpu).plans
    for block, plan in cpu_plans.items():
        assert torch.equal(gpu_plans[block].keep.cpu(), plan.keep), block
        assert torch.equal(gpu_plans[block].src.cpu(), plan.src), block
    assert torch.equal(pitome.merge_info(gpu).source.cpu(), pitome.merge_info(cpu).source)


@pytest.mark.parametrize("algo", ALGOS)
def test_bf16_gpu_output_is_close_to_fp32(algo):
    model = build("vit").cuda()
    pitome.patch(model, algo=algo, ratio=0.8)
    x = images(4).cuda()
    with torch.no_grad():
        reference = model(x)
        low = model.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert (low - reference).norm() / reference.norm() < 5e-2


def test_cuda_graph_replay_matches_eager():
    model = build("deit_distilled").cuda()
    pitome.patch(model, ratio=0.8, prop_attn=True)
    x = images(4).cuda()
    with torch.no_grad():
        eager = model(x)
    graphed = CudaGraphForward(model, x)
    torch.testing.assert_close(graphed(x), eager)
    other = images(4, seed=5).cuda()
    with torch.no_grad():
        torch.testing.assert_close(graphed(other), model(other))
    with pytest.raises(ValueError, match="captured for"):
        graphed(images(2).cuda())


def test_peak_memory_not_above_unpatched():
    model = build("vit").cuda()
    x = images(64).cuda()

    def peak() -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            model(x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    unpatched = peak()
    pitome.patch(model, ratio=0.9)
    assert peak() <= unpatched


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("batch", [1, 8])
def test_planning_ahead_on_a_side_stream_merges_as_in_series(monkeypatch, algo, batch):
    model = build("vit").cuda().to(torch.bfloat16)
    pitome.patch(model, algo=algo, ratio=0.8, prop_attn=True, keep_plans=True)
    x = images(batch).cuda().to(torch.bfloat16)
    planned_ahead = []
    plan_ahead = MergeState.plan_ahead

    def spy(state, keys, block):
        planned_ahead.append(plan_ahead(state, keys, block))
        return planned_ahead[-1]

    monkeypatch.setattr(MergeState, "plan_ahead", spy)
    monkeypatch.setenv("PITOME_PLAN_AHEAD", "on")  # eager plans in series unless asked
    with torch.no_grad():
        ahead = model(x)
        ahead_plans = pitome.merge_info(model).plans
        graphed = CudaGraphForward(model, x)(x)
        monkeypatch.setenv("PITOME_PLAN_AHEAD", "off")
        in_series = model(x)
        series_plans = pitome.merge_info(model).plans
    assert any(planned_ahead) and not planned_ahead[-1]
    monkeypatch.setenv("PITOME_PLAN_AHEAD", "auto")
    with torch.no_grad():
        planned_ahead.clear()
        model(x)
        assert not any(planned_ahead)  # eager: in series
        assert torch.equal(CudaGraphForward(model, x)(x), in_series)
        assert any(planned_ahead)  # captured: ahead
    assert torch.equal(ahead, in_series) and torch.equal(graphed, in_series)
    for block, plan in series_plans.items():
        assert torch.equal(ahead_plans[block].keep, plan.keep), block
        assert torch.equal(ahead_plans[block].src, plan.src), block


def test_benchmarked_graphs_take_turns_and_peak_memory_is_their_own(monkeypatch):
    from pitome import bench

    timed = []
    time_forward = bench.time_forward

    def spy(run, device, warmup, repeats):
        timed.append(run)
        return time_forward(run, device, warmup, repeats)

    monkeypatch.setattr(bench, "time_forward", spy)
    model = build("vit")
    rows = bench.benchmark(model, ["none", "tome"], 0.8, 4, torch.device("cuda"),
                           torch.bfloat16, warmup=1, repeats=2, cuda_graph=True, rounds=2)
    assert len(timed) == 4 and timed[0] is timed[2] and timed[1] is timed[3]
    assert timed[0] is not timed[1]
    unpatched, merged = (row.peak_memory_mib for row in rows)
    assert merged <= unpatched + 1.0  # the unpatched graph, still held, is not counted
    assert all(row.host_ms is not None and row.host_ms > 0 for row in rows)

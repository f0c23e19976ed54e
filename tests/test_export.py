"""torch.export of merged models with a dynamic batch: one exported program for every batch
size, computing what the eager merged model computes (issue #19, export)."""

from __future__ import annotations

import pytest
import torch
from conftest import build, images

import pitome

transformers = pytest.importorskip("transformers")


def _hf_vit():
    config = transformers.ViTConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                                    num_attention_heads=3, image_size=64, patch_size=8)
    return transformers.ViTModel(config, add_pooling_layer=False).eval()


class LastHidden(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state


MODELS = {"timm-vit": lambda: build("vit"), "timm-registers": lambda: build("registers"),
          "hf-vit": lambda: LastHidden(_hf_vit())}


@pytest.mark.parametrize("algo", ["pitome", "tome"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_with_a_dynamic_batch_matches_eager(name, algo):
    torch.manual_seed(0)
    model = MODELS[name]()
    pitome.patch(getattr(model, "model", model), algo=algo, ratio=0.8)
    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.export.export(model, (images(2),), dynamic_shapes=({0: batch},))
    exported = program.module()
    for size in (1, 3, 17):
        x = images(size, seed=size)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(exported(x), expected, atol=1e-5, rtol=1e-5)
    info = pitome.merge_info(getattr(model, "model", model))
    assert info.token_counts[-1] < info.token_counts[0]


SLOW = pytest.mark.slow  # each ONNX export takes ~20 s on a 2-core CPU


@pytest.mark.parametrize("name, algo", [("timm-vit", "pitome"),
                                        pytest.param("timm-vit", "tome", marks=SLOW),
                                        pytest.param("hf-vit", "pitome", marks=SLOW),
                                        pytest.param("hf-vit", "tome", marks=SLOW)])
def test_onnx_export_runs_in_onnxruntime_with_a_dynamic_batch(tmp_path, name, algo):
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = MODELS[name]()
    pitome.patch(getattr(model, "model", model), algo=algo, ratio=0.8)
    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.onnx.export(model, (images(2),), dynamic_shapes=({0: batch},), dynamo=True,
                                verbose=False)
    program.save(str(tmp_path / "merged.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "merged.onnx"),
                                           providers=["CPUExecutionProvider"])
    name_in = session.get_inputs()[0].name
    for size in (1, 5):
        x = images(size, seed=size)
        with torch.no_grad():
            expected = model(x)
        out = torch.from_numpy(session.run(None, {name_in: x.numpy()})[0])
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_tracing_export_is_refused_naming_the_way_that_works(tmp_path):
    model = build("vit")
    pitome.patch(model, algo="tome", ratio=0.8)
    with pytest.raises(NotImplementedError, match="torch.export.export"):
        torch.jit.trace(model, images(2))
    with pytest.raises(Exception, match="dynamo=True"):
        torch.onnx.export(model, (images(2),), str(tmp_path / "legacy.onnx"), dynamo=False)
    assert pitome.merge_config(model) is not None  # still patched, still usable
    with torch.no_grad():
        assert model(images(2)).shape == (2, 10)

"""ONNX export of evaluation models: onnxruntime's logits are PyTorch's for every token-reduction
method (with LoRA folded), DyT's MLP skipping stays real in the graph, and what cannot be
exported or checked is refused with one sentence."""

from __future__ import annotations

import sys

import pytest
import torch

import tieta
from tieta.deploy.onnx import _onnx_translations, check_onnx, export_onnx, onnx_session
from tieta.errors import TietaError
from tieta.native import tensor_code
from tests.conftest import make_vit, randomise_parameters
from tests.registry_cases import attach, names_besides
from tieta.methods import registry

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

BATCH, SIZE = 2, 32  # the SMALL ViT of conftest: 32 px, patch 8, depth 3
ATOL = 1e-4


def with_lora(variant: str = "plain") -> torch.nn.Module:
    """A small random ViT with trained-looking LoRA, to be folded after the method is attached."""
    model = tieta.add_lora(make_vit(variant), rank=2)
    return randomise_parameters(model, ("lora_B",), seed=1)


def tome(variant: str):
    return lambda: tieta.add_tome(with_lora(variant), r=4)


def pyra():
    return randomise_parameters(tieta.add_pyra(with_lora(), r=4), ("pyra",), seed=2)


def dyt(variant: str = "mlp"):
    def build():
        model = tieta.add_dyt(with_lora(), rho=0.5, variant=variant)
        return randomise_parameters(model, ("dispatcher", "adapter"), seed=3)  # some tokens skip, some not
    return build


def dynamicvit():
    return randomise_parameters(tieta.add_dynamicvit(with_lora(), ratios=(0.7, 0.5), locations=(1, 2)),
                                ("predictor",), seed=4)


# name -> builder of an evaluation model (LoRA merged after the method is attached)
MODELS = {
    "tome-plain": tome("plain"),
    "tome-registers": tome("registers"),
    "pyra": pyra,
    "dyt-mlp": dyt("mlp"),
    "evit": lambda: tieta.add_evit(with_lora(), keep_rate=0.5, locations=(1, 2)),
    "dynamicvit": dynamicvit,
    "diffrate": lambda: tieta.add_diffrate(with_lora(), [17, 14, 12], [17, 12, 10]),
}

# every other registered token reducer, by its registry entry (tests/registry_cases.py); name -> why not
COVERED_BY_HAND = {"tome", "pyra", "dyt", "evit", "dynamicvit", "diffrate"}
EXCLUDED: dict[str, str] = {}
for _name in names_besides(COVERED_BY_HAND, EXCLUDED):
    if registry.METHODS[_name].reduces_tokens:
        MODELS[_name] = lambda name=_name: attach(name, with_lora(), seed=5)


def evaluation_model(name: str) -> torch.nn.Module:
    return tieta.merge_lora(MODELS[name]()).eval()


def images(seed: int, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def assert_one_sentence(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert text and "\n" not in text and "Traceback" not in text
    return text


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_logits_match_pytorch(name, tmp_path):
    model = evaluation_model(name)
    batch = images(seed=10)
    with torch.inference_mode(), tensor_code():  # one image at a time: no shape of the export is seen first
        before = torch.cat([model(image[None]) for image in batch])
    path = export_onnx(model, tmp_path / f"{name}.onnx", BATCH, SIZE)
    assert check_onnx(model, path, batch) < ATOL
    # the export traced the model on fake tensors: none stayed behind in its states or caches
    with torch.inference_mode(), tensor_code():
        after = model(batch)
    assert type(after) is torch.Tensor and torch.allclose(after, before, atol=1e-5) and not model.training


def test_dyt_mlp_dispatch_exports_real_skipping(tmp_path):
    """The packed MLP rows are computed from the data inside the graph: batches that activate
    different numbers of tokens both give PyTorch's logits."""
    model = evaluation_model("dyt-mlp")
    path = export_onnx(model, tmp_path / "dyt.onnx", BATCH, SIZE)
    assert "NonZero" in op_types(path)
    first, second = images(seed=11), images(seed=12) * 3
    rates = [tieta.activation_rates(model, batch) for batch in (first, second)]
    assert rates[0] != rates[1] and 0 < min(min(rates)) and max(max(rates)) < 1
    assert check_onnx(model, path, first) < ATOL
    assert check_onnx(model, path, second) < ATOL


def test_dyt_attention_dispatch_exports_the_masked_form(tmp_path):
    model = tieta.merge_lora(dyt("attn")()).eval()
    with pytest.warns(UserWarning, match="masked form"):
        path = export_onnx(model, tmp_path / "dyt_attn.onnx", BATCH, SIZE)
    assert model.dispatch_state.real_skip  # the model itself still skips for real
    assert "NonZero" not in op_types(path)
    assert check_onnx(model, path, images(seed=13)) < ATOL


def test_tie_breaks_and_scatter_mean_translate_exactly(tmp_path):
    """The two translations tieta adds: a stable sort (ties: lower index first) and a scatter mean
    with repeated destinations (the exporter's own writes a plain scatter)."""

    class SortAndMerge(torch.nn.Module):
        def forward(self, scores, dst, src, index):
            order = scores.argsort(dim=-1, descending=True, stable=True)
            merged = dst.scatter_reduce(1, index.expand_as(src), src, reduce="mean", include_self=True)
            return order, merged

    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1, 0.5]])
    dst, src = torch.randn(1, 3, 4), torch.randn(1, 5, 4)
    index = torch.tensor([[[0], [2], [0], [0], [2]]])
    inputs = (scores, dst, src, index)
    path = tmp_path / "ops.onnx"
    torch.onnx.export(SortAndMerge().eval(), inputs, str(path), dynamo=True, opset_version=18, verbose=False,
                      custom_translation_table=_onnx_translations())
    session = onnx_session(path)
    names = [value.name for value in session.get_inputs()]
    order, merged = session.run(None, {name: tensor.numpy() for name, tensor in zip(names, inputs)})
    expected_order, expected_merged = SortAndMerge()(*inputs)
    assert order.tolist() == expected_order.tolist() == [[1, 3, 0, 2, 5, 4]]
    assert torch.allclose(torch.from_numpy(merged), expected_merged, atol=1e-6)


# --- refusals -------------------------------------------------------------------------------------


def test_an_unfinished_diffrate_search_is_refused(tmp_path):
    model = tieta.add_diffrate(make_vit("plain"))  # rate logits, no kept numbers yet
    with pytest.raises(TietaError) as error:
        export_onnx(model, tmp_path / "m.onnx", BATCH, SIZE)
    assert "fix_rates" in assert_one_sentence(error)
    assert not (tmp_path / "m.onnx").exists()


def test_sizes_that_do_not_fit_are_refused(tmp_path):
    model = make_vit("plain")
    for batch, size, word in ((0, SIZE, "batch size"), (BATCH, 30, "patch size")):
        with pytest.raises(TietaError) as error:
            export_onnx(model, tmp_path / "m.onnx", batch, size)
        assert word in assert_one_sentence(error)


def test_check_refuses_images_of_another_shape(tmp_path):
    model = make_vit("plain")
    path = export_onnx(model, tmp_path / "plain.onnx", BATCH, SIZE)
    with pytest.raises(TietaError) as error:
        check_onnx(model, path, images(seed=0, batch=BATCH + 1))
    assert "export it again" in assert_one_sentence(error)


@pytest.mark.parametrize("missing", ["onnxruntime", "onnxscript"])
def test_a_missing_extra_is_named(missing, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    model = make_vit("plain")
    with pytest.raises(TietaError) as error:
        if missing == "onnxscript":
            export_onnx(model, tmp_path / "m.onnx", BATCH, SIZE)
        else:
            check_onnx(model, tmp_path / "m.onnx", images(seed=0))
    text = assert_one_sentence(error)
    assert missing in text and "tieta[onnx]" in text

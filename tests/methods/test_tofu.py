"""ToFu as a method: r = 0 is timm, the whole model against a transcription of the reference's
forward, its token counts and FLOPs, and the ways out (export, ONNX, torch.compile). What every
token reducer promises (composition, copies, no parameters, the same logits in training) is in
``test_every_method.py``."""

from __future__ import annotations

import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tieta
from tieta.cli import main
from tieta.methods.schedules import model_macs, vit_shape
from tieta.methods.tofu import TokenFusion, describe_tofu
from tests.conftest import EVA_VARIANTS, VIT_VARIANTS, make_vit, tokens_entering
from tests.ops.test_tofu_ops import reference_tofu


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VIT_VARIANTS) + list(EVA_VARIANTS))
def test_r_zero_equals_unpatched_timm(variant):
    model = make_vit(variant)
    x = images()
    with torch.no_grad():
        expected = model(x)
        tieta.add_tofu(model, r=0)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def reference_forward(model: VisionTransformer, x: torch.Tensor, schedule: list[int]) -> torch.Tensor:
    """OpenToMe's ToFuVisionTransformer on an unpatched timm ViT, as its blocks are written: the
    attention by hand (keys averaged over heads as the metric), then the merge in the mode of the
    block (prune while i <= depth // 2, tofu after), then the MLP."""
    distilled = getattr(model, "dist_token", None) is not None
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    depth = len(model.blocks)
    for index, block in enumerate(model.blocks):
        attn = block.attn
        h = block.norm1(x)
        batch, tokens, channels = h.shape
        qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, channels // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
        x = x + attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, channels))
        if schedule[index] > 0:
            mode = "tofu" if index > depth // 2 else "prune"
            x = reference_tofu(x, k.mean(1), schedule[index], True, distilled, mode)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("variant", ["plain", "distilled"])
def test_whole_model_matches_the_reference(variant):
    x = images()
    schedule = [3, 2, 2]
    with torch.no_grad():
        expected = reference_forward(make_vit(variant), x, schedule)
        got = tieta.add_tofu(make_vit(variant), r=schedule)(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _vit_b16_layout(width: int = 48) -> VisionTransformer:
    """ViT-B/16's token layout (224 px, 196 patches, depth 12) at a small width."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=224, patch_size=16, embed_dim=width, depth=12, num_heads=3, num_classes=10).eval()


def test_token_counts_and_flops_at_the_vit_b16_layout():
    model = tieta.add_tofu(_vit_b16_layout(), r=[16] * 11 + [10])  # "low" at ViT-B/16
    x = torch.randn(1, 3, 224, 224)
    mlp_tokens = [197 - 16 * (i + 1) for i in range(11)] + [197 - 176 - 10]
    assert tokens_entering(model, x, "mlp") == mlp_tokens
    facts = describe_tofu(model)
    assert facts["token_counts"] == [197] + mlp_tokens and facts["fusing_blocks"] == [7, 8, 9, 10, 11]
    schedule = facts["schedule"]
    plain = tieta.count_flops(_vit_b16_layout(), x)["gmacs"]
    counted = tieta.count_flops(model, x)["gmacs"]
    assert counted < 0.6 * plain
    # ToMe's cost at the same schedule (attention on the tokens entering, MLP on those left, the
    # matching); the norms and the rescaling are no matrix products
    assert counted * 1e9 == pytest.approx(model_macs(vit_shape(model), schedule), rel=1e-9)


def test_tokens_per_block_follow_any_schedule_and_prefix(vit_variant):
    model = tieta.add_tofu(make_vit(vit_variant), r=[3, 2, 1])
    tokens = 16 + model.num_prefix_tokens
    assert tokens_entering(model, images(), "mlp") == [tokens - 3, tokens - 5, tokens - 6]
    assert model(images()).shape == (2, 5)
    assert model.token_state.size is None  # no sizes: no proportional attention, a uniform average pool


@pytest.mark.parametrize("variant", list(EVA_VARIANTS))
def test_rope_models_merge_with_positions_following(variant):
    model = tieta.add_tofu(make_vit(variant), r=[3, 2, 2])
    out = model(images())
    tokens = 16 + model.num_prefix_tokens
    assert tokens_entering(model, images(), "mlp") == [tokens - 3, tokens - 5, tokens - 7]
    positions = model.token_state.positions  # each patch token left stands where one patch (its destination) stood
    assert positions.shape == (2, 16 - 7)
    assert all(row.min() >= 0 and len(set(row.tolist())) == len(row) for row in positions)
    assert torch.isfinite(out).all() and not torch.allclose(out, make_vit(variant)(images()))


def test_refusals_are_one_sentence():
    with pytest.raises(tieta.TietaError, match="already reduces tokens"):
        tieta.add_tofu(tieta.add_evit(make_vit("plain")), r=2)
    with pytest.raises(tieta.TietaError, match="cannot be negative"):
        tieta.add_tofu(make_vit("plain"), r=-1)
    model = make_vit("plain")
    with pytest.raises(tieta.TietaError, match="block"):
        tieta.add_tofu(model, r=[9, 9, 9])  # more than 17 tokens allow
    assert not any(isinstance(block.reduce, TokenFusion) for block in model.blocks if hasattr(block, "reduce"))


def test_merge_figures_are_refused_in_one_sentence():
    from tieta.report.visualize import merge_groups

    with pytest.raises(tieta.TietaError, match="ToFu prunes tokens"):
        merge_groups(tieta.add_tofu(make_vit("plain"), r=2), images())


def test_compiles_to_one_graph_with_the_eager_logits():
    from tieta.deploy.compiled import compile_model

    model = tieta.add_tofu(make_vit("registers"), r=2)
    # fullgraph: a graph break is an error; the eager backend runs dynamo's graph without inductor's build
    compiled = compile_model(model, backend="eager", fullgraph=True)
    with torch.inference_mode():
        assert torch.allclose(compiled(images()), model(images()), atol=1e-5, rtol=0)


def test_train_export_onnx_and_load_give_the_trained_logits(vtab_task, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tieta.train.fit import load_run_model

    run, export = tmp_path / "run", tmp_path / "export"
    assert main(["train", "--model", "test_vit", "--weights", "random", "--img-size", "32", "--lora-rank", "2",
                 "--method", "tofu+lora", "--schedule", "[1,1]", "--data", str(vtab_task), "--output", str(run),
                 "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "tofu+lora" and summary["acc"] is not None
    assert main(["export", str(run), "--output", str(export), "--onnx", "--onnx-batch-size", "2"]) == 0
    assert float(capsys.readouterr().out.split("onnxruntime ")[-1].split()[0]) < 1e-4
    trained = load_run_model(run)[0].eval()
    x = images(3, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(tieta.load(export)(x), trained(x), rtol=1e-4, atol=1e-5)

"""DTEM as a method: r = 0 is timm's model, the whole model against a transcription of the
reference's ``DTEM`` forward (training: soft merging; evaluation: hard), token counts and FLOPs,
compilation, and training, export and ONNX through the command line. What every token reducer
promises (composition with LoRA and the adapter, training its own weights, copies) is in
``test_every_method.py``."""

import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tieta
from tieta.cli import main
from tieta.methods.dtem import DTEMMerge, describe
from tieta.methods.schedules import VIT_B16, ViTShape, clip_schedule, model_macs, token_counts, vit_shape
from tests.conftest import EVA_VARIANTS, make_vit, tokens_entering
from tests.ops.test_dtem_ops import reference_merge_eval, reference_merge_train


def _vit_b16_layout(width=48):
    """ViT-B/16's token layout (224 px, 196 patches, depth 12) at a small width."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=224, patch_size=16, embed_dim=width, depth=12, num_heads=3, num_classes=10).eval()


def _images(batch=2, size=32, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- the reference's DTEM forward (dtem/dtem.py), transcribed on a tieta model's modules -------

def reference_attention(attn, x, size):
    """``DTEMAttention.forward`` with ``prop_attn=True``: x (B, N, C) normalised, size (B, N)."""
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    q = q * attn.scale
    scores = q @ k.transpose(-2, -1)
    _attn = scores - torch.max(scores, dim=-1, keepdim=True)[0]
    _attn = _attn.exp_() * size[:, None, None, :].type(torch.float32)
    weights = _attn / _attn.sum(dim=-1, keepdim=True)
    out = (weights @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(out)


def reference_forward(model, images, r, training):
    """``DTEM.forward``: every block merges r (the reference's ``update_r``), then the head."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    n = x.size(1)
    size = torch.ones_like(x[..., 0])
    for block in model.blocks:
        normed = block.norm1(x)
        x = x + block.drop_path1(block.ls1(reference_attention(block.attn, normed, size)))
        embed = block.reduce.dtem_embed
        metric = embed(normed.detach()) if training else embed(normed)  # DTEMLinear: metric_layer(input.detach())
        if r > 0 and n > 0:
            if training:
                x, size, n = reference_merge_train(x, size, r, n, metric)
            else:
                x, size = reference_merge_eval(x, size, r, metric)
                n = x.size(1)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_r_zero_equals_unpatched_timm(vit_variant, mode):
    model = make_vit(vit_variant).train(mode == "train")
    x = _images()
    expected = model(x)
    tieta.add_dtem(model, r=0)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("variant", list(EVA_VARIANTS))
def test_rope_models_are_refused_in_one_sentence(variant):
    with pytest.raises(tieta.TietaError, match="rotary position embeddings") as error:
        tieta.add_dtem(make_vit(variant), r=2)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("variant", ["plain", "layerscale", "qk_norm"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_model_is_the_references(variant, mode):
    model = tieta.add_dtem(make_vit(variant), r=3).train(mode == "train")
    x = _images(seed=1)
    got = model(x)
    expected = reference_forward(model, x, 3, training=mode == "train")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if mode == "train":  # the embeddings learn through the soft merge, identically
        weights = [p for name, p in model.named_parameters() if "dtem_embed" in name]
        ours = torch.autograd.grad(got.square().sum(), weights)
        theirs = torch.autograd.grad(expected.square().sum(), weights)
        # (the last block's merge cannot reach the class token's logits: no gradient there, in both)
        assert all(g.abs().sum() > 0 for g in ours[:-2]) and all(g.abs().sum() == 0 for g in ours[-2:])
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_token_counts_at_vit_b16_layout():
    model = tieta.add_dtem(_vit_b16_layout(), r=16)
    x = torch.randn(1, 3, 224, 224)
    evaluation = [197 - 16 * i for i in range(12)]  # 16 per block, 10 in the last (21 tokens left)
    assert tokens_entering(model, x, "norm1") == evaluation
    assert describe(model) == {"schedule": [16] * 11 + [10], "token_counts": evaluation + [11]}
    model.train()
    assert tokens_entering(model, x, "norm1") == [197] * 12  # training keeps every token ...
    assert model.soft_merge_state.active == 11  # ... and the same 186 fall behind the active ones


def test_flops_count_the_executed_path_and_the_embeddings():
    model = tieta.add_dtem(_vit_b16_layout(), r=16)
    x = torch.randn(1, 3, 224, 224)
    shape = vit_shape(model)
    schedule = describe(model)["schedule"]
    plain = model_macs(shape, [0] * 12)
    embeddings = sum(n * 48 * 16 for n in describe(model)["token_counts"][:-1])  # D -> head width 16, per block
    expected = model_macs(shape, schedule) + embeddings
    assert tieta.count_flops(model, x)["gmacs"] * 1e9 == pytest.approx(expected, rel=1e-9)
    assert expected < 0.6 * plain


def _cost(shape, r=16, metric_dim=64):
    """GMACs of DTEM at evaluation, counted as test_flops_count_the_executed_path_and_the_embeddings
    shows count_flops counts it, and the share of the plain model's cost it removes."""
    schedule = clip_schedule(shape, [r] * shape.depth)
    embeddings = sum(n * shape.width * metric_dim for n in token_counts(shape, schedule)[:-1])
    macs = model_macs(shape, schedule) + embeddings
    return macs / 1e9, 1 - macs / model_macs(shape, [0] * shape.depth)


def test_cost_and_size_at_the_defaults_as_the_readme_says():
    gmacs, removed = _cost(VIT_B16)
    assert round(gmacs, 2) == 8.84 and round(100 * removed, 1) == 49.7
    assert round(_cost(VIT_B16)[0] - model_macs(VIT_B16, [16] * 11 + [10]) / 1e9, 2) == 0.06  # beside ToMe's low
    vit_s16 = ViTShape(12, 384, 1536, 6, 196, 1, 196 * 384 * 768, 384 * 1000)
    assert round(100 * _cost(vit_s16)[1], 1) == 49.4
    assert 12 * sum(p.numel() for p in DTEMMerge(768, 64, 16).parameters()) == 590_592


def test_compiles_without_graph_breaks():
    from tieta.deploy.compiled import compile_model, graph_breaks

    model = tieta.add_dtem(make_vit("registers"), r=2)
    assert graph_breaks(model, _images()) == 0
    compiled = compile_model(model, backend="aot_eager")  # dynamo's graph without inductor's code generation
    with torch.inference_mode():
        torch.testing.assert_close(compiled(_images()), model(_images()), rtol=0, atol=1e-5)


def test_forward_is_forward_head_of_forward_features_in_training():
    # pooled by soft size (in evaluation by size, as every reducer's: test_every_method.py)
    model = tieta.add_dtem(make_vit("avg_pool"), r=2).train()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(_images())), model(_images()))


def test_refusals():
    with pytest.raises(tieta.TietaError, match="already reduces tokens"):
        tieta.add_dtem(tieta.add_tome(make_vit("plain"), r=2))
    with pytest.raises(tieta.TietaError, match="already has DTEM"):
        tieta.add_dtem(tieta.add_dtem(make_vit("plain")))
    for settings, message in (({"r": -1}, "negative"), ({"r": 1.5}, "whole number"), ({"candidates": 0}, "at least 1"),
                              ({"tau_select": 0}, "positive"), ({"metric_dim": 0}, "metric_dim")):
        with pytest.raises(tieta.TietaError, match=message):
            tieta.add_dtem(make_vit("plain"), **settings)
    from tieta.train.config import load_config

    for key, value in (("dtem.r", -1), ("dtem.candidates", 0), ("dtem.tau_score", 0.0), ("dtem.metric_dim", 0)):
        with pytest.raises(tieta.TietaError, match=key):
            load_config(overrides={"method": "dtem", key: value})


def test_train_export_onnx_and_load_through_the_command_line(vtab_task, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tieta.train.fit import load_run_model

    run, export = tmp_path / "run", tmp_path / "export"
    assert main(["train", "--model", "test_vit", "--weights", "random", "--img-size", "32", "--lora-rank", "2",
                 "--method", "dtem+lora", "--dtem-r", "2", "--data", str(vtab_task), "--output", str(run),
                 "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4"]) == 0
    assert json.loads((run / "summary.json").read_text())["acc"] is not None
    assert main(["export", str(run), "--output", str(export), "--onnx"]) == 0
    printed = capsys.readouterr().out.split("largest logit difference from PyTorch in onnxruntime")[1].split()[0]
    assert float(printed) < 1e-4
    trained, _, _ = load_run_model(run)
    loaded = tieta.load(export)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_images(5)), trained.eval()(_images(5)), rtol=1e-4, atol=1e-5)
    assert any(isinstance(block.reduce, DTEMMerge) for block in loaded.blocks)

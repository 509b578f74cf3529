"""PiToMe as a method: ratio 1 is timm, the whole model against a transcription of the
reference's forward, its token counts and cost, and the ways out (export, ONNX, torch.compile).
What every token reducer promises (composition, copies, no parameters, the same logits in
training) is in ``test_every_method.py``."""

from __future__ import annotations

import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tieta
from tieta.cli import main
from tieta.methods.pitome import EnergyMerge, token_counts
from tests.conftest import EVA_VARIANTS, VIT_VARIANTS, make_vit, tokens_entering
from tests.ops.test_pitome_ops import reference_merge_wavg, reference_pitome_vision


def images(batch: int = 2, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VIT_VARIANTS) + list(EVA_VARIANTS))
def test_ratio_one_equals_unpatched_timm(variant):
    model = make_vit(variant)
    x = images()
    with torch.no_grad():
        expected = model(x)
        tieta.add_pitome(model, ratio=1.0)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_a_block_that_merges_nothing_leaves_its_tokens():
    model = make_vit("plain")
    x = images()
    with torch.no_grad():
        expected = model(x)
        tieta.add_pitome(model, ratio=0.95)  # 16 patches: floor(16 - 15.2) = 0 in every block
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def reference_forward(model: VisionTransformer, x: torch.Tensor, ratio: float) -> torch.Tensor:
    """The reference's PiToMeVisionTransformer on an unpatched timm ViT with a class token, as its
    blocks are written: attention by hand without sizes (keys averaged over heads as the metric),
    ``pitome_vision`` with the block's margin (bipartite in the first ceil(depth / 2) blocks), the
    size-weighted merge, then the MLP."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    depth, size = len(model.blocks), None
    margins = [.75 - .75 * (i / depth) for i in range(depth)]
    for index, block in enumerate(model.blocks):
        attn = block.attn
        h = block.norm1(x)
        batch, tokens, channels = h.shape
        qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, channels // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
        x = x + attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, channels))
        merge = reference_pitome_vision(k.mean(1), ratio, margins[index], True, index < (depth + 1) // 2)
        if merge is not None:
            x, size = reference_merge_wavg(merge, x, size)
        x = x + block.mlp(block.norm2(x))
    return model.forward_head(model.norm(x))


def test_whole_model_matches_the_reference():
    x = images()
    with torch.no_grad():
        expected = reference_forward(make_vit("plain"), x, 0.7)
        model = tieta.add_pitome(make_vit("plain"), ratio=0.7)
        got = model(x)
    assert tokens_entering(model, x, "mlp") == [13, 10, 8]  # 16 patches: 4, 3 and 2 merged
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def vit_b16_layout(width: int) -> VisionTransformer:
    """ViT-B/16's token layout (224 px, 196 patches, depth 12, head dim 64) at any width."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=224, patch_size=16, embed_dim=width, depth=12, num_heads=width // 64,
                             num_classes=1000).eval()


def reference_counts(ratio: float = 0.9125) -> list[int]:
    """Tokens entering each block, then leaving the last, by the reference's r = floor(T - T * ratio)."""
    counts, tokens = [197], 196
    for _ in range(12):
        tokens -= int(tokens - tokens * ratio)
        counts.append(tokens + 1)
    return counts


def vit_b16_macs(width: int, counts: list[int]) -> int:
    """What count_flops counts: attention on the tokens entering a block, the MLP on those left, and
    the energy's similarity matrix (T x T over the 64 channels of the head-summed keys)."""
    total = 196 * width * 3 * 16 * 16 + width * 1000  # patch embedding and head
    for entering, leaving in zip(counts, counts[1:]):
        total += 4 * entering * width ** 2 + 2 * entering ** 2 * width + (entering - 1) ** 2 * 64
        total += 2 * leaving * width * 4 * width
    return total


def test_token_counts_and_cost_as_the_reference_computes_them():
    model = tieta.add_pitome(vit_b16_layout(128))
    counts = reference_counts()
    assert counts == [197, 180, 165, 151, 138, 127, 116, 106, 97, 89, 82, 75, 69]
    assert token_counts(model) == counts
    x = torch.randn(1, 3, 224, 224)
    assert tokens_entering(model, x, "mlp") == counts[1:]
    assert tieta.count_flops(model, x)["gmacs"] * 1e9 == pytest.approx(vit_b16_macs(128, counts), rel=1e-9)
    # ViT-B/16 (width 768), as `tieta flops --model vit_base_patch16_224 --method pitome` prints it
    assert round(vit_b16_macs(768, counts) / 1e9, 3) == 10.629


def test_prefix_tokens_stay_and_sizes_weight_the_average_pool(vit_variant):
    model = tieta.add_pitome(make_vit(vit_variant), ratio=0.6)
    x = images()
    features = model.forward_features(x)
    size = model.token_state.size
    prefix = model.num_prefix_tokens
    assert features.shape[1] == token_counts(model)[-1] and torch.all(size[:, :prefix] == 1)
    assert torch.all(size.sum(dim=1) == 16 + prefix)
    if vit_variant == "avg_pool":
        pooled = (features * size).sum(1) / size.sum(1)
        torch.testing.assert_close(model.forward_head(features), model.head(model.fc_norm(pooled)))


@pytest.mark.parametrize("variant", list(EVA_VARIANTS))
def test_rope_models_merge_with_positions_following(variant):
    model = tieta.add_pitome(make_vit(variant), ratio=0.6)
    out = model(images())
    assert tokens_entering(model, images(), "mlp") == token_counts(model)[1:]
    positions = model.token_state.positions  # each patch token left stands where one patch (its destination) stood
    assert positions.shape == (2, token_counts(model)[-1] - model.num_prefix_tokens)
    assert all(row.min() >= 0 and len(set(row.tolist())) == len(row) for row in positions)
    assert torch.isfinite(out).all() and not torch.allclose(out, make_vit(variant)(images()))


def test_refusals_are_one_sentence():
    with pytest.raises(tieta.TietaError, match="already reduces tokens"):
        tieta.add_pitome(tieta.add_tofu(make_vit("plain"), r=2))
    for ratio in (0.4, 1.5, float("nan"), True):
        with pytest.raises(tieta.TietaError, match=r"ratio .* \[0.5, 1\]"):
            tieta.add_pitome(make_vit("plain"), ratio=ratio)
    model = make_vit("plain")
    with pytest.raises(tieta.TietaError, match="one value per block"):
        tieta.add_pitome(model, margins=[0.5, 0.4])
    assert not any(isinstance(getattr(block, "reduce", None), EnergyMerge) for block in model.blocks)
    from tieta.train.config import load_config
    with pytest.raises(tieta.TietaError, match="pitome.ratio"):
        load_config(overrides={"method": "pitome", "pitome.ratio": 0.2})


def test_merge_groups_cover_every_patch():
    from tieta.report.visualize import merge_groups

    model = tieta.add_pitome(make_vit("registers"), ratio=0.6)
    groups = merge_groups(model, images())
    assert groups.shape == (2, 4, 4) and groups.min() >= model.num_prefix_tokens
    assert all(len(set(image.flatten().tolist())) == token_counts(model)[-1] - 5 for image in groups)


def test_compiles_to_one_graph_with_the_eager_logits():
    from tieta.deploy.compiled import compile_model

    model = tieta.add_pitome(make_vit("registers"), ratio=0.7)
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
                 "--method", "pitome+lora", "--pitome-ratio", "0.5", "--data", str(vtab_task), "--output", str(run),
                 "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "pitome+lora" and summary["acc"] is not None
    assert main(["export", str(run), "--output", str(export), "--onnx", "--onnx-batch-size", "2"]) == 0
    assert float(capsys.readouterr().out.split("onnxruntime ")[-1].split()[0]) < 1e-4
    trained = load_run_model(run)[0].eval()
    x = images(3, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(tieta.load(export)(x), trained(x), rtol=1e-4, atol=1e-5)

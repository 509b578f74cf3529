"""ATC as a method: identity when every token is kept, the reference's logits and token counts,
FLOPs on the executed path, torch.compile, and the command line from training to an exported (and
ONNX) model. What every token reducer promises (composition, copies, no parameters, the same logits
in training) is in ``test_every_method.py``."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tieta
from tieta.methods.atc import ATCReduce, token_counts
from tieta.ops.atc import LINKAGES
from tests.conftest import EVA_VARIANTS, make_vit, tokens_entering
from tests.ops.test_atc_ops import reference_atc


def _vit_b16_layout(width=48):
    """ViT-B/16's token layout (224 px, 196 patches, depth 12) at a small width."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=224, patch_size=16, embed_dim=width, depth=12, num_heads=3, num_classes=10).eval()


def reference_logits(model, images, clusters, linkage, prop_attn):
    """The reference's ``AgglomerativeClusteringVisionTransformer.forward`` (``Block_ATC`` with
    ``Attention_ToMe``) written out on a plain timm ViT's weights; ``clusters``: per block, 0 for none."""
    x = model._pos_embed(model.patch_embed(images))
    size = None
    for block, count in zip(model.blocks, clusters):
        attn = block.attn
        B, N, C = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        metric = k.mean(1)
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        x_attn = attn.proj((logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C))
        x = x + x_attn
        if count > 0:
            x, size, _ = reference_atc(metric, x, size, count, linkage)
        x = x + block.mlp(block.norm2(x))
        if not prop_attn:
            size = None
    return model.head(model.norm(x)[:, 0])


def test_keep_rate_one_equals_unpatched_timm(vit_variant):
    model = make_vit(vit_variant)
    x = torch.randn(2, 3, 32, 32)
    expected = {}
    for mode in (False, True):
        torch.manual_seed(1)
        expected[mode] = model.train(mode)(x)
    tieta.add_atc(model, keep_rate=1.0, locations=[0, 1, 2])
    for mode in (False, True):
        torch.manual_seed(1)
        torch.testing.assert_close(model.train(mode)(x), expected[mode], rtol=0, atol=0)


@pytest.mark.parametrize("variant", list(EVA_VARIANTS))
def test_rotary_models_are_refused_in_one_sentence(variant):
    with pytest.raises(tieta.TietaError, match="rotary position embeddings") as error:
        tieta.add_atc(make_vit(variant))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize("prop_attn", [True, False])
def test_logits_are_the_references(linkage, prop_attn):
    model = make_vit("plain")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference_logits(model, images, [11, 7, 5], linkage, prop_attn)  # 16 patches * 0.7 ** i
        tieta.add_atc(model, keep_rate=0.7, locations=[0, 1, 2], linkage=linkage, prop_attn=prop_attn)
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)


def test_token_counts_of_the_reference_at_vit_b16_layout():
    expected = [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3  # the class token and 137, 96, 67 clusters
    model = tieta.add_atc(_vit_b16_layout(), keep_rate=0.7)
    assert tokens_entering(model, torch.randn(1, 3, 224, 224), "mlp") == expected
    assert token_counts(model) == expected
    # the cost the README gives for ViT-B/16 at the defaults (tieta flops: 11.426 GMACs)
    assert round(_field_gmacs(expected, 768, 12, patches=196, classes=1000, patch_size=16), 3) == 11.426
    chosen = tieta.add_atc(_vit_b16_layout(), locations=[2, 8], clusters=[100, 20])
    assert token_counts(chosen) == [197] * 2 + [101] * 6 + [21] * 4


def _field_gmacs(counts, width, heads, patches=16, classes=5, patch_size=8):
    """Attention on the tokens entering a block, the MLP on its own count, the patch embedding and
    head, and each clustering's distances: the cosine of every pair of patch keys (head width)."""
    total = patches * width * 3 * patch_size ** 2 + width * classes
    entering = patches + 1
    for mlp_tokens in counts:
        total += 4 * entering * width ** 2 + 2 * entering ** 2 * width + 8 * mlp_tokens * width ** 2
        if mlp_tokens != entering:
            total += (entering - 1) ** 2 * (width // heads)
        entering = mlp_tokens
    return total / 1e9


def test_flops_count_the_executed_path():
    model = tieta.add_atc(make_vit("plain"), keep_rate=0.7, locations=[0, 1, 2])
    x = torch.randn(2, 3, 32, 32)
    plain = tieta.count_flops(make_vit("plain"), x)["gmacs"]
    counted = tieta.count_flops(model, x)["gmacs"]
    assert counted < plain
    assert counted == pytest.approx(_field_gmacs(token_counts(model), 48, 3), rel=1e-9)


@pytest.mark.parametrize("linkage", ["complete", "single"])  # the two code paths
def test_compiles_to_one_graph_with_the_eager_logits(linkage):
    from tieta.deploy.compiled import compile_model

    model = tieta.add_atc(make_vit("registers"), locations=[1], clusters=[12], linkage=linkage)
    x = torch.randn(2, 3, 32, 32)
    # one graph (fullgraph: a break is an error), run without inductor's slow code generation
    compiled = compile_model(model, backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)


def test_single_linkage_exports_to_onnx(tmp_path):
    """The spanning tree's stable sort in the graph (the command-line test below exports the other
    linkages' code path)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tieta.deploy.onnx import check_onnx, export_onnx

    model = tieta.add_atc(make_vit("registers"), locations=[1], clusters=[12], linkage="single")
    path = export_onnx(model, tmp_path / "model.onnx", 2, 32)
    assert check_onnx(model, path, torch.randn(2, 3, 32, 32)) < 1e-4


def test_refusals_are_one_sentence():
    for kwargs, message in [({"keep_rate": 0}, "keep_rate"), ({"linkage": "ward"}, "linkage"),
                            ({"clusters": [3]}, "clusters gives 1 counts for 3 locations"),
                            ({"keep_rate": 0.05}, "keep no patch token"), ({"locations": [5]}, "locations")]:
        with pytest.raises(tieta.TietaError, match=message):
            tieta.add_atc(make_vit("plain"), **kwargs)
    with pytest.raises(tieta.TietaError, match="already reduces tokens"):
        tieta.add_atc(tieta.add_tome(make_vit("plain"), r=2))
    with pytest.raises(tieta.TietaError, match="already reduces tokens"):
        tieta.add_evit(tieta.add_atc(make_vit("plain")))
    model = tieta.add_atc(make_vit("plain"), keep_rate=0.5)
    assert [isinstance(b.reduce, ATCReduce) for b in model.blocks] == [True] * 3  # depth 3: 0, 1, 2


def test_trains_exports_and_loads_through_the_command_line(vtab_task, tmp_path, capsys, quick_throughput):
    """tieta train (atc+lora), tieta export with an ONNX file checked by onnxruntime, tieta.load."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tieta.cli import main
    from tieta.train.fit import load_run_model

    run, exported = tmp_path / "run", tmp_path / "export"
    assert main(["train", "--model", "test_vit", "--weights", "random", "--img-size", "64", "--method", "atc+lora",
                 "--lora-rank", "2", "--linkage", "complete", "--data", str(vtab_task),
                 "--set", "atc.locations=[1]", "--set", "atc.clusters=[13]",  # 3 merge steps: a quick export
                 "--output", str(run), "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4"]) == 0
    assert main(["export", str(run), "--output", str(exported), "--onnx", "--onnx-batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert float(out.split("onnxruntime ")[-1].split()[0]) < 1e-4
    loaded = tieta.load(exported)
    trained, _, _ = load_run_model(run)
    assert any(isinstance(b.reduce, ATCReduce) and b.reduce.linkage == "complete" for b in loaded.blocks)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), trained.eval()(images), rtol=1e-4, atol=1e-5)

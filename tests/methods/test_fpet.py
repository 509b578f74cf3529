"""FPET as a method: no merge equals timm, the reference's whole forward pass (a literal
transcription of its FPETBlock / FPETAttention), its token counts and FLOPs, composition with LoRA
and adapters training its refinement, export, ONNX and torch.compile (copies: test_every_method.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import tieta
from tieta.methods.fpet import FPETMerge, token_counts
from tests.conftest import EVA_VARIANTS, make_vit, tokens_entering
from tests.ops.test_fpet_ops import ref_bipartite_diff_matching, ref_merge_wavg, ref_qlinear_weight


def images(batch: int = 2, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def trained_looking(model):
    """Refinement weights away from the reference's near-zero start, so that it changes the matching."""
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".fpet." in name:
                param.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("variant,mode", [
    *[(variant, "eval") for variant in ("plain", "layerscale", "qk_norm", "registers", "distilled", "avg_pool",
                                        *EVA_VARIANTS)],
    ("plain", "train"), ("eva02", "train"),
])
def test_no_merging_block_equals_unpatched_timm(variant, mode):
    model = make_vit(variant).train(mode == "train")
    x = images()
    torch.manual_seed(1)
    expected = model(x)
    tieta.add_fpet(model, layers=[])
    torch.manual_seed(1)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def reference_forward(model: VisionTransformer, x: torch.Tensor, layer: int) -> torch.Tensor:
    """The reference's FPET ViT (apply_fpet.py with its adaptformer.Adapter refinement, eval), as
    written there: unfused attention returning k.mean(1), log-size bias, the merge between the
    residuals; timm's own embedding, norms and head around it."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    size = None
    for index, block in enumerate(model.blocks):
        attn = block.attn
        h = block.norm1(x)
        B, N, C = h.shape
        qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q @ k.transpose(-2, -1)) * attn.scale
        if size is not None:
            scores = scores + size.log()[:, None, None, :, 0]
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
        x = x + attn.proj(out)
        if index == layer:
            refinement = block.fpet
            metric = k.mean(1).detach()
            down = F.linear(metric, ref_qlinear_weight(refinement.down.weight))
            metric = metric + 1 * F.linear(F.relu(down), ref_qlinear_weight(refinement.up.weight))
            merge, _ = ref_bipartite_diff_matching(metric, True)
            x, size = ref_merge_wavg(merge, x, size)
        x = x + block.mlp(block.norm2(x))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("layer", [0, 2])
def test_the_reference_forward_pass(layer):
    model = trained_looking(tieta.add_fpet(make_vit("plain"), layers=[layer]))
    x = images(batch=3)
    with torch.no_grad():
        expected = reference_forward(model, x, layer)
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _vit_b16_layout(width=48):
    """ViT-B/16's token layout (224 px, 196 patches, depth 12) at a small width."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=224, patch_size=16, embed_dim=width, depth=12, num_heads=3,
                             num_classes=10).eval()


def test_token_counts_of_the_reference_at_vit_b16_layout():
    model = tieta.add_fpet(_vit_b16_layout())
    x = images(batch=1, size=224)
    assert isinstance(model.blocks[6].reduce, FPETMerge)
    assert tokens_entering(model, x, "mlp") == token_counts(model) == [197] * 6 + [99] * 6
    assert tokens_entering(model, x, "norm1") == [197] * 7 + [99] * 5


def test_vit_b16_cost_by_the_baselines_counter():
    """DiffRate's counter (tests/methods/test_evit.py): attention on the tokens entering a block,
    the MLP on its own count, the patch embedding over 197 tokens and the head."""
    counts, width = token_counts(tieta.add_fpet(_vit_b16_layout())), 768
    total, entering = 197 * width * 768 + width * 1000, 197
    for mlp_tokens in counts:
        total += 4 * entering * width ** 2 + 2 * entering ** 2 * width + 8 * mlp_tokens * width ** 2
        entering = mlp_tokens
    assert round(total / 1e9, 2) == 13.41


def test_flops_count_the_executed_path():
    model = tieta.add_fpet(_vit_b16_layout())
    x = images(batch=1, size=224)
    width, head_dim, classes, hidden = 48, 16, 10, 32

    def attention(n):
        return 4 * n * width ** 2 + 2 * n * n * width

    expected = 196 * width * 768 + width * classes
    expected += 7 * attention(197) + 5 * attention(99) + 6 * 8 * 197 * width ** 2 + 6 * 8 * 99 * width ** 2
    expected += 197 * 2 * head_dim * hidden  # the refinement on every token's keys
    expected += 98 * 98 * head_dim + 98 * 98 * (width + 1)  # the A x B scores, the merge (tokens and sizes)
    assert tieta.count_flops(model, x)["gmacs"] * 1e9 == pytest.approx(expected, rel=1e-9)
    plain = 196 * width * 768 + width * classes + 12 * (attention(197) + 8 * 197 * width ** 2)
    assert expected < 0.8 * plain


def test_composes_with_lora_and_adapter_and_trains_its_refinement():
    model = tieta.add_fpet(make_vit("registers"), layers=[1])
    tieta.add_adapter(tieta.add_lora(model, rank=2), dim=2)
    tieta.freeze_backbone(model).train()
    model(images()).sum().backward()
    for word in ("lora_B", "adapter.up", ".fpet."):  # (up projections start at 0: down gets no gradient)
        grads = [p.grad for n, p in model.named_parameters() if word in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), word
    assert not any(p.requires_grad for n, p in model.named_parameters() if "qkv.weight" in n)
    assert sum(p.numel() for n, p in model.named_parameters() if ".fpet." in n) == 2 * 16 * 32


def test_full_precision_refinement_starts_at_the_identity():
    model = tieta.add_fpet(make_vit("plain"), layers=[1], refine_bits=32)
    refinement = model.blocks[1].fpet
    assert torch.equal(refinement.up.weight, torch.zeros_like(refinement.up.weight))
    assert refinement(torch.randn(2, 5, 16)).abs().sum() == 0
    assert refinement.dropout.p == 0.1 and refinement.down.bias is None and refinement.up.bias is None


def test_refusals_are_one_sentence():
    with pytest.raises(tieta.TietaError, match="already reduces tokens"):
        tieta.add_fpet(tieta.add_tome(make_vit("plain"), r=2))
    model = make_vit("plain")
    with pytest.raises(tieta.TietaError, match="one block"):
        tieta.add_fpet(model, layers=[0, 1])
    assert type(model) is VisionTransformer  # a refused call leaves the model as it was
    with pytest.raises(tieta.TietaError, match="fewer than 2 tokens"):
        tieta.add_fpet(VisionTransformer(img_size=8, patch_size=8, embed_dim=32, depth=2, num_heads=2))
    with pytest.raises(tieta.TietaError, match="block index in 0..2"):
        tieta.add_fpet(make_vit("plain"), layers=[3])
    with pytest.raises(tieta.TietaError, match="refine_bits"):
        tieta.add_fpet(make_vit("plain"), refine_bits=8)
    with pytest.raises(tieta.TietaError, match="already has FPET"):
        tieta.add_fpet(tieta.add_fpet(make_vit("plain")))
    with pytest.raises(tieta.TietaError, match="patch grid"):
        FPETMerge((4, 4)).split(10)


def test_export_load_onnx_and_compile(vtab_task, tmp_path, capsys):
    """A run trained with fpet+lora: ``tieta export --onnx`` writes a file onnxruntime agrees with,
    ``tieta.load`` gives the run's logits, and torch.compile traces it in one graph."""
    from tieta.cli import main
    from tieta.deploy.compiled import compile_model, graph_breaks
    from tieta.train.config import load_config
    from tieta.train.fit import fit, load_run_model

    overrides = {"model": "test_vit", "weights": "random", "img_size": 32, "optim.epochs": 1,
                 "optim.warmup_epochs": 0, "optim.batch_size": 4, "eval_batch_size": 8, "lora.rank": 2,
                 "data.path": str(vtab_task), "method": "fpet+lora"}
    run = tmp_path / "run"
    fit(load_config(overrides=overrides), run)
    onnx = pytest.importorskip("onnxruntime") and pytest.importorskip("onnxscript")
    argv = ["export", str(run), "--output", str(tmp_path / "export")]
    assert main(argv + (["--onnx", "--onnx-batch-size", "2"] if onnx else [])) == 0
    out = capsys.readouterr().out
    assert float(out.split("onnxruntime ")[-1].split()[0]) < 1e-4
    loaded = tieta.load(tmp_path / "export")
    trained, _, _ = load_run_model(run)
    trained.eval()
    x = images(batch=3, size=32)
    with torch.no_grad():
        expected = trained(x)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-5)
    assert graph_breaks(trained, x) == 0
    with torch.inference_mode():
        assert torch.allclose(compile_model(trained)(x), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", list(EVA_VARIANTS))
def test_eva_models_merge_and_the_kept_tokens_keep_their_rope_positions(variant):
    model = trained_looking(tieta.add_fpet(make_vit(variant), layers=[1]))
    x = images()
    assert tokens_entering(model, x, "mlp") == [17, 9, 9]
    with torch.no_grad():
        model(x)
    split = model.blocks[1].reduce
    assert torch.equal(model.token_state.positions, split.b_index[None].expand(2, -1))


def test_source_tracing_holds_every_patch_once():
    model = trained_looking(tieta.add_fpet(make_vit("registers"), layers=[0]))
    model.token_state.trace_source = True
    with torch.no_grad():
        model(images())
    source = model.token_state.source  # (B, 5 + 8, 5 + 16)
    assert source.shape == (2, 13, 21)
    assert torch.equal(source.sum(dim=1), torch.ones(2, 21))
    assert torch.equal(source[:, :5, :5], torch.eye(5).expand(2, -1, -1))


def test_entry_points_agree_on_an_average_pool_model():
    """The pool weights tokens by the sizes the merge left, whichever entry point ran the pass."""
    model = trained_looking(tieta.add_fpet(make_vit("avg_pool"), layers=[1]))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x), rtol=0, atol=0)
        final, intermediates = model.forward_intermediates(x, output_fmt="NLC")
    assert [tokens.shape[1] for tokens in intermediates] == [16, 8, 8]
    assert model.token_state.size.sum(dim=1).flatten().tolist() == [16.0, 16.0]


def test_settings_are_checked_with_the_config():
    from tieta.train.config import load_config

    config = load_config(overrides={"method": "fpet", "fpet.layers": [4]})
    assert config.fpet.layers == [4] and config.fpet.refine_dim == 32 and config.fpet.refine_bits == 1
    for setting, message in ((("fpet.layers", [1, 2]), "one block at most"), (("fpet.refine_bits", 4), "1 or 32"),
                             (("fpet.layers", [-1]), "block index")):
        with pytest.raises(tieta.TietaError, match=message):
            load_config(overrides={"method": "fpet", setting[0]: setting[1]})


def test_a_layer_flag_that_is_no_index_is_one_sentence(capsys):
    from tests.conftest import refused

    assert "a layer flag takes one block index, got 'six'" in refused(capsys, "flops", "--method", "fpet",
                                                                      "--fpet-layer", "six")


def test_mixed_precision_matches_in_float32():
    """Near-uniform images: in bfloat16 every best score would round to a tie with the mean of the
    two best, and every A token would vanish; the matching runs in float32 and all merge."""
    model = tieta.add_fpet(make_vit("plain"), layers=[0])
    x = images(batch=4) * 0.05 + 1
    for dtype in (None, torch.bfloat16):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            model(x)
        assert model.token_state.size[:, 1:].sum(dim=1).flatten().tolist() == [16.0] * 4

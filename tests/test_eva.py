"""timm's Eva family (EVA-02, the rope ViTs) as a backbone for every method: rotary embeddings
follow the tokens that merging and pruning keep, LoRA targets Eva's projection layouts, Eva's
masked attention is timm's, and what cannot work is refused with one sentence."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import tieta
from tieta.errors import TietaError
from tieta.methods.attention import masked_eva_attention
from tieta.methods.blocks import TietaEvaBlock, patch_blocks
from tieta.methods.lora import LoRALinear
from tieta.ops.rope import NO_POSITION, follow, rope_at, rotate
from tests.conftest import EVA_VARIANTS, SMALL, _eva, make_vit, randomise_parameters


@pytest.fixture(params=list(EVA_VARIANTS))
def vit_variant(request) -> str:
    """The ViT parity tests imported below run on the Eva variants (this module's override)."""
    return request.param


# the ViT suites' parity tests, called here on the Eva variants (as modules, so that pytest does not
# collect their ViT parametrisations twice)
from tests.methods import test_diffrate, test_dynamicvit, test_dyt, test_entry_points, test_evit  # noqa: E402
from tests.methods import test_persistence, test_tome  # noqa: E402


def test_every_method_off_is_timm(vit_variant):
    """Patched blocks, ToMe with r=0, EViT keeping all, DynamicViT keeping all, DiffRate keeping all."""
    model = make_vit(vit_variant)
    x = images()
    with torch.no_grad():
        expected = model(x)
        patch_blocks(model)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    test_tome.test_r_zero_equals_unpatched_timm(vit_variant)
    test_evit.test_keep_rate_one_equals_unpatched_timm(vit_variant, "train")
    test_dynamicvit.test_ratio_one_equals_unpatched_timm(vit_variant)
    test_diffrate.test_keeping_every_token_equals_unpatched_timm(vit_variant)


def test_pyra_at_initialisation_is_tome(vit_variant):
    test_tome.test_pyra_at_initialisation_equals_tome(vit_variant, [3, 2, 1])


@pytest.mark.parametrize("variant", ["attn_mlp", "layer"])
def test_dyt_real_skipping_is_the_masked_computation(vit_variant, variant):
    test_dyt.test_real_skipping_equals_masked_computation(vit_variant, variant, 4)


@pytest.mark.parametrize("method", ["pyra", "dyt_attn"])
def test_timm_entry_points(vit_variant, method):
    test_entry_points.test_forward_is_forward_head_of_forward_features(vit_variant, method)
    test_entry_points.test_mixed_entry_points_and_batch_sizes_give_what_a_fresh_model_gives(vit_variant, method)


def test_intermediates(vit_variant):
    test_entry_points.test_nlc_intermediates_hold_the_tokens_after_merging(vit_variant, "tome")
    test_entry_points.test_nchw_intermediates_after_merging_are_the_full_grid(vit_variant, "tome")
    test_entry_points.test_nchw_intermediates_without_merging_equal_timm(vit_variant)


@pytest.mark.parametrize("vit_variant,method", [("eva02", "pyra+lora"), ("rope_vit", "dyt+tome")])
def test_copies_and_saved_models_compute_the_same(vit_variant, method):
    test_persistence.test_deepcopy_computes_the_same(vit_variant, method)
    test_persistence.test_state_dict_loads_into_a_model_built_the_same_way(vit_variant, method)
    test_persistence.test_torch_save_and_load_in_the_same_process(vit_variant, method)


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --- tieta.ops.rope -------------------------------------------------------------------------------


def test_follow_takes_the_positions_of_the_continued_tokens():
    first = follow(None, torch.tensor([[3, 0, NO_POSITION], [1, 2, 0]]), patches=4)
    assert first.tolist() == [[3, 0, NO_POSITION], [1, 2, 0]]
    assert follow(first, torch.tensor([[2, 0], [1, 1]]), patches=3).tolist() == [[NO_POSITION, 3], [2, 2]]


@pytest.mark.parametrize("shape", [(5, 8), (2, 5, 8), (3, 1, 5, 8)])
def test_rope_at_takes_rows_and_no_position_is_no_rotation(shape):
    rope = torch.randn(shape)
    positions = torch.tensor([[4, 0, NO_POSITION], [1, 1, 2], [NO_POSITION, 3, 4]])
    rows = rope_at(rope, positions)  # (B, H', 3, d)
    table = rope if rope.ndim == 4 else rope.reshape(1, -1, 5, 8).expand(3, -1, -1, -1)
    assert rows.shape == (3, table.shape[1], 3, 8)
    torch.testing.assert_close(rows[0, :, 0], table[0, :, 4])
    torch.testing.assert_close(rows[1, :, 1], table[1, :, 1])
    torch.testing.assert_close(rows[2, :, 0], torch.cat([torch.zeros(4), torch.ones(4)]).expand(table.shape[1], 8))
    t = torch.randn(3, 2, 4, 4)  # (B, H, 1 prefix + 3, hd): a token at NO_POSITION is not rotated
    out = rotate(t, rows[..., :3, :], num_prefix=1)
    torch.testing.assert_close(out[0, :, 3], t[0, :, 3])
    torch.testing.assert_close(out[:, :, 0], t[:, :, 0])


# --- rotary embeddings follow the tokens ----------------------------------------------------------


def _without_following(model):
    model.token_state.rope_follows = False
    return model


@pytest.mark.parametrize("variant", list(EVA_VARIANTS))
def test_reordering_tokens_changes_nothing_because_positions_follow(variant):
    """DiffRate keeping every token only sorts them: attention does not care about order once each
    token keeps its rotary position, so the model computes what timm computes."""
    model = randomise_parameters(make_vit(variant), ("qkv.weight",))  # sharp attention, which rope shifts
    x = images()
    with torch.no_grad():
        expected = model(x)
        tokens = SMALL["img_size"] ** 2 // SMALL["patch_size"] ** 2 + model.num_prefix_tokens
        tieta.add_diffrate(model, [tokens] * 3, [tokens] * 3)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        assert model.token_state.positions is not None
        assert not torch.allclose(_without_following(model)(x), expected, atol=1e-3), "rope must matter here"


def test_a_merged_token_keeps_its_destinations_position():
    """ToMe's output order is [prefix, unmerged A, B]: the B tokens (odd token indices, patch
    positions 0, 2, 4, ...) all stay, the A tokens that stay keep their own (odd) positions."""
    model = tieta.add_tome(make_vit("rope_vit"), r=[3, 0, 0])
    with torch.no_grad():
        model(images())
    positions = model.token_state.positions  # (B, 16 - 3)
    assert positions.shape == (2, 13)
    assert positions[:, 5:].tolist() == [list(range(0, 16, 2))] * 2
    for row in positions[:, :5].tolist():
        assert row == sorted(row) and all(p % 2 == 1 for p in row)


def test_evit_fused_token_has_no_position_and_kept_tokens_keep_theirs():
    model = tieta.add_evit(make_vit("eva02"), keep_rate=0.5, locations=(1,))
    with torch.no_grad():
        model(images())
    positions = model.token_state.positions
    assert positions.shape == (2, 8 + 1) and (positions[:, -1] == NO_POSITION).all()
    for row in positions[:, :-1].tolist():
        assert len(set(row)) == 8 and all(0 <= p < 16 for p in row)


def test_dynamicvit_kept_tokens_keep_their_positions():
    model = randomise_parameters(tieta.add_dynamicvit(make_vit("rope_vit"), ratios=(0.5,), locations=(1,)),
                                 ("predictor",))
    with torch.no_grad():
        model(images())
    positions = model.token_state.positions
    assert positions.shape == (2, 8)
    assert all(len(set(row)) == 8 for row in positions.tolist())


def _rotated_qk(block, tokens, rope):
    """Block ``block``'s queries and keys on ``tokens`` as timm's AttentionRope rotates them (one
    class token; the fused, biased qkv of the rope ViT)."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    attn = block.attn
    qkv = attn.qkv(block.norm1(tokens)).reshape(*tokens.shape[:2], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return tuple(torch.cat([t[:, :, :1], apply_rot_embed_cat(t[:, :, 1:], rope)], dim=2) for t in (q, k))


@pytest.mark.parametrize("method", ["tome", "evit", "diffrate"])
def test_tokens_are_ranked_by_the_queries_and_keys_attention_used(monkeypatch, method):
    """On a rope model ToMe's key similarity, EViT's and DiffRate's class attention see the rotated
    queries and keys; the native merge, which gives no kept rows for positions to follow, steps aside."""
    import tieta.methods.diffrate as diffrate
    import tieta.methods.evit as evit
    import tieta.methods.tome as tome

    seen = []
    for module, name in ((tome, "bipartite_soft_matching"), (evit, "class_attention"), (diffrate, "token_importance")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, real=real: seen.append(args[:2]) or real(*args))
    monkeypatch.setattr(tome, "native_merge", lambda *args: pytest.fail("the native merge ran on a rope model"))
    model = make_vit("rope_vit")
    x = images()
    with torch.no_grad():  # block 0's (DiffRate's block 0 ranks and sorts, keeping every token)
        q, k = _rotated_qk(model.blocks[0], model._pos_embed(model.patch_embed(x))[0], model.rope.get_embed())
        if method == "tome":
            tieta.add_tome(model, r=[2, 0, 0])
        elif method == "evit":
            tieta.add_evit(model, keep_rate=0.5, locations=(0,))
        else:
            tieta.add_diffrate(model, [17, 12, 10], [17, 10, 8])
        model(x)
    if method == "tome":
        torch.testing.assert_close(seen[0][0], k.sum(dim=1), rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(seen[0], (q, k), rtol=1e-5, atol=1e-5)


def test_diffrate_merge_destinations_keep_their_positions():
    model = tieta.add_diffrate(make_vit("rope_vit"), [17, 12, 12], [17, 9, 9])
    with torch.no_grad():
        model(images())
    positions = model.token_state.positions  # the 8 most important of 16 patches; the rest merged in
    assert positions.shape == (2, 8) and all(len(set(row)) == 8 for row in positions.tolist())


# --- timm's Eva attention, restated for masked training ------------------------------------------


@pytest.mark.parametrize("kind", ["eva02", "eva02_separate_qkv", "rope_vit"])
def test_masked_eva_attention_with_all_ones_policy_is_timms_attention(kind):
    model = _eva("eva02_tiny_patch14_224", qkv_fused=False, scale_attn_inner=True) if kind == "eva02_separate_qkv" \
        else make_vit(kind)
    model = randomise_parameters(model, ("bias", "norm"))
    attn, x = model.blocks[0].attn, torch.randn(2, 17, SMALL["embed_dim"])
    rope = model.rope.get_embed()
    with torch.no_grad():
        expected = attn(x, rope=rope)
        torch.testing.assert_close(masked_eva_attention(attn, x, torch.ones(2, 17), rope=rope), expected,
                                   rtol=1e-4, atol=1e-5)


# --- LoRA on Eva's projection layouts -------------------------------------------------------------


@pytest.mark.parametrize("build,layers", [
    (lambda: make_vit("eva02"), ("qkv",)),  # fused, with EVA's separate q/v biases
    (lambda: make_vit("rope_vit"), ("qkv",)),  # fused, biased nn.Linear
    (lambda: randomise_parameters(_eva("eva02_tiny_patch14_224", qkv_fused=False), ("head",)),
     ("q_proj", "k_proj", "v_proj")),
])
@pytest.mark.parametrize("targets", ["qkv", "qv"])
def test_lora_on_eva_changes_the_output_and_merges_exactly(build, layers, targets):
    model = build().eval()
    x = images()
    with torch.no_grad():
        before = model(x)
        tieta.add_lora(model, rank=2, targets=targets, dropout=0.0)
        attn = model.blocks[0].attn
        assert all(isinstance(getattr(attn, name), LoRALinear) for name in layers if targets == "qkv" or
                   name[0] in targets)
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)  # a fresh LoRA is the identity
        randomise_parameters(model, ("lora_B",), seed=1)
        unmerged = model(x)
        assert not torch.allclose(unmerged, before, atol=1e-4), "LoRA must be on the path the attention runs"
        tieta.merge_lora(model)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-4, atol=1e-5)


def test_lora_targets_on_separate_projections():
    model = tieta.add_lora(_eva("eva02_tiny_patch14_224", qkv_fused=False), rank=2, targets="qv")
    attn = model.blocks[0].attn
    assert isinstance(attn.q_proj, LoRALinear) and isinstance(attn.v_proj, LoRALinear)
    assert type(attn.k_proj) is torch.nn.Linear


# --- every method, trained and evaluated ----------------------------------------------------------


METHODS = {
    "tome": lambda m: tieta.add_tome(m, r=2),
    "pyra": lambda m: tieta.add_pyra(m, r=2),
    "evit": lambda m: tieta.add_evit(m, keep_rate=0.5),
    "dynamicvit": lambda m: tieta.add_dynamicvit(m, ratios=(0.7, 0.5), locations=(1, 2)),
    "diffrate": lambda m: tieta.add_diffrate(m, [18, 14, 12], [18, 12, 10]),
    "diffrate_search": lambda m: tieta.add_diffrate(m, target_gmacs=0.0001),
    "dyt_layer": lambda m: tieta.add_dyt(m, variant="layer"),
    "lora_adapter": lambda m: tieta.add_adapter(tieta.add_lora(m, rank=2), dim=4),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_and_evaluates_on_rope_mixed(method):
    """The rope ViT with per-block learned (mixed) rope and a register token."""
    torch.manual_seed(0)
    model = METHODS[method](_eva("vit_small_patch16_rope_mixed_224", num_reg_tokens=1))
    model.train()
    model(images()).sum().backward()
    copy.deepcopy(model).eval()(images())
    assert model.eval()(images()).shape == (2, SMALL["num_classes"])


# --- what Eva cannot do ---------------------------------------------------------------------------


def test_windowed_attention_is_refused():
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    sam = VisionTransformerSAM(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, window_size=2,
                               global_attn_indexes=(), use_rel_pos=False, neck_chans=8)
    with pytest.raises(TietaError, match="windowed attention needs the full patch grid"):
        tieta.add_tome(sam, r=2)


def test_a_post_norm_eva_is_refused():
    model = _eva("eva02_tiny_patch14_224", use_post_norm=True)
    with pytest.raises(TietaError, match="pre-norm eva.EvaBlock only"):
        tieta.add_lora(model)


def test_patched_eva_blocks_are_tieta_eva_blocks():
    model = make_vit("eva02")
    assert all(type(block) is TietaEvaBlock for block in patch_blocks(model))


# --- loading and training from the command line --------------------------------------------------


@timm.models.register_model
def tieta_test_eva(pretrained: bool = False, **kwargs):
    """A tiny EVA-02 under a timm name, for the command line (which takes timm names)."""
    shape = dict(patch_size=14, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4 * 2 / 3, swiglu_mlp=True,
                 use_rot_pos_emb=True)
    return timm.models.eva._create_eva("eva02_tiny_patch14_224", pretrained=pretrained, **{**shape, **kwargs})


def test_load_backbone_train_export_and_load_an_eva(vtab_task, tmp_path, capsys):
    from tieta.cli import main

    model = tieta.load_backbone("eva02_tiny_patch14_224", weights="random", num_classes=3, img_size=28)
    assert type(model).__name__ == "Eva" and model.num_classes == 3 and model.patch_embed.img_size == (28, 28)
    run = tmp_path / "run"
    assert main(["train", "--model", "tieta_test_eva", "--weights", "random", "--img-size", "28",
                 "--method", "pyra+lora", "--lora-rank", "2", "--data", str(vtab_task), "--output", str(run),
                 "--epochs", "1", "--batch-size", "4"]) == 0
    assert "acc %" in capsys.readouterr().out
    # tieta export -> tieta.load: the trained model's logits, LoRA folded
    from tieta.deploy.export import export_run
    from tieta.train.fit import load_run_model

    export_run(run, tmp_path / "export")
    loaded = tieta.load(tmp_path / "export")
    trained = load_run_model(run)[0].eval()
    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x), rtol=1e-4, atol=1e-5)
    assert not any("lora" in key for key in loaded.state_dict())


# --- ONNX -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,attach", [
    ("eva02", lambda m: tieta.add_tome(m, r=4)),
    ("rope_vit", lambda m: tieta.add_evit(m, keep_rate=0.5, locations=(1, 2))),
])
def test_onnx_logits_of_a_reduced_eva_match_pytorch(tmp_path, variant, attach):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tieta.deploy.onnx import check_onnx, export_onnx

    model = randomise_parameters(tieta.add_lora(make_vit(variant), rank=2), ("lora_B",), seed=1)
    model = tieta.merge_lora(attach(model)).eval()
    path = export_onnx(model, tmp_path / "eva.onnx", 2, 32)
    assert check_onnx(model, path, images(seed=10)) < 1e-4

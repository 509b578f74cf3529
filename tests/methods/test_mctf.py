"""MCTF as a method: identity at r = 0, the reference's token counts, the whole model against a
transcription of the reference's blocks (``models/modules/blocks.py``, ``models/SA/MHSA.py``), FLOPs
of the executed path, composition with LoRA and adapters, copies, its objective, export, ONNX and
torch.compile."""

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import tieta
from tieta.methods.mctf import MultiCriteriaFusion, mctf_loss, token_counts
from tests.conftest import make_vit, randomise_parameters, tokens_entering
from tests.ops.test_mctf_ops import reference_matching, reference_merge_wavg, reference_r


def _vit(img_size=64, width=48, depth=4, seed=0):
    """A plain class-token ViT, the reference's architecture (64 px / patch 8: 65 tokens)."""
    torch.manual_seed(seed)
    return VisionTransformer(img_size=img_size, patch_size=8 if img_size == 64 else 16, embed_dim=width,
                             depth=depth, num_heads=3, num_classes=5).eval()


def _images(count=2, size=64, seed=0):
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_r_zero_equals_unpatched_timm(vit_variant, mode):
    model = make_vit(vit_variant).train(mode == "train")
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    expected = model(x)
    tieta.add_mctf(model, r=0, layers=[0, 1, 2])
    torch.manual_seed(1)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_eva_models_are_refused_in_one_sentence():
    with pytest.raises(tieta.TietaError, match="not on Eva") as error:
        tieta.add_mctf(make_vit("rope_vit"))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("r,layers,expected", [
    (16, None, [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21]),  # the reference's DeiT setting
    (0.35, [3, 6, 9], [197] * 3 + [129] * 3 + [85] * 3 + [56] * 3),  # its "fast" setting
])
def test_token_counts_of_the_reference_at_vit_b16_layout(r, layers, expected):
    model = tieta.add_mctf(_vit(img_size=224, depth=12), r=r, layers=layers)
    assert tokens_entering(model, _images(1, 224), "mlp") == expected
    assert token_counts(model) == expected


def test_at_least_ten_tokens_stay():
    model = tieta.add_mctf(make_vit("plain"), r=16)  # 17 tokens: 7 go in block 1, none after
    assert tokens_entering(model, torch.randn(1, 3, 32, 32), "mlp") == token_counts(model) == [17, 10, 10]


def test_traced_sources_are_the_groups_sizes_count():
    model = tieta.add_mctf(_vit(), r=8)
    model.token_state.trace_source = True
    with torch.no_grad():
        model(_images())
    state = model.token_state
    assert state.source.shape == (2, 41, 65)
    torch.testing.assert_close(state.source.sum(dim=-1, keepdim=True), state.size)
    assert bool((state.source.sum(dim=1) == 1).all())  # every input token in exactly one group


def reference_forward(model, images, r, layers, prop_attn=True):
    """The reference's evaluation forward (one-step-ahead 1, pooling 1, bidirectional, taus 1/20/40)
    on a plain timm ViT's weights, written as its ``Block_DEIT`` and ``MHSA`` are."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    info_size = None

    def qkv_rows(attn, x, rows):
        C = x.shape[-1]
        return x @ attn.qkv.weight.T[:, rows[0] * C:rows[1] * C] + attn.qkv.bias[rows[0] * C:rows[1] * C]

    def attention_map(attn, x, size):
        B, N, C = x.shape
        qk = qkv_rows(attn, x, (0, 2)).reshape(B, N, 2, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        a = (qk[0] @ qk[1].transpose(-2, -1)) * attn.scale
        if size is not None:
            a = a + size.log()[:, None, None, :, 0]
        return a.softmax(dim=-1)

    def with_map(attn, x, a):
        B, N, C = x.shape
        v = qkv_rows(attn, x, (2, 3)).reshape(B, N, attn.num_heads, C // attn.num_heads).permute(0, 2, 1, 3)
        return attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))

    for index, block in enumerate(model.blocks):
        size = info_size if prop_attn else None
        if index in layers:
            a = attention_map(block.attn, block.norm1(x), size)
            count = reference_r(x.shape[1], r, 1)
            if count == 0:
                x_attn = with_map(block.attn, block.norm1(x), attention_map(block.attn, block.norm1(x), size))
            else:
                merge = reference_matching(x, a, info_size, count, 1, 1, 20, 40, True)
                x, info_size, a_n = reference_merge_wavg(merge, x, info_size, a)
                x_attn = with_map(block.attn, block.norm1(x), a_n)
        else:
            x_attn = with_map(block.attn, block.norm1(x), attention_map(block.attn, block.norm1(x), size))
        x = x + x_attn
        x = x + block.mlp(block.norm2(x))
    return model.head(model.norm(x)[:, 0])


@pytest.mark.parametrize("r,layers", [(8, [1, 2, 3]), (0.35, [1, 3]), (30, [0, 2])])
def test_whole_model_equals_the_reference(r, layers):
    plain = _vit().double()
    model = tieta.add_mctf(copy.deepcopy(plain), r=r, layers=layers)
    images = _images().double()
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference_forward(plain, images, r, layers), rtol=1e-10, atol=1e-10)


def _counted_macs(width=48, tokens=65, layers=(1, 2, 3), r=8, depth=4, classes=5, patch_pixels=192):
    """MACs of what executes: a fusing block computes q and k on the tokens it receives, their
    logits and similarities, then v, attention, projection and MLP on the fused tokens."""
    total = (tokens - 1) * width * patch_pixels + width * classes
    for index in range(depth):
        if index in layers:
            fused = tokens - r
            scored = tokens - 1
            total += 2 * tokens * width ** 2 + tokens ** 2 * width + (scored // 2) * ((scored + 1) // 2) * width
            total += 2 * fused * width ** 2 + fused ** 2 * width + 8 * fused * width ** 2
            tokens = fused
        else:
            total += 4 * tokens * width ** 2 + 2 * tokens ** 2 * width + 8 * tokens * width ** 2
    return total


def test_cost_at_the_defaults_on_vit_b16_and_the_reference_deits():
    """The count above at 224 px, every block but the first fusing 16 tokens: ViT-B/16, and the
    DeiT-S and DeiT-T shapes, for which the reference's README lists 2.60 and 0.71 GFLOPs."""
    def gmacs(width):
        return _counted_macs(width, 197, range(1, 12), 16, 12, 1000, 768) / 1e9

    assert (round(gmacs(768), 2), round(gmacs(384), 2), round(gmacs(192), 2)) == (9.92, 2.59, 0.71)


def test_flops_count_the_executed_path():
    plain = _vit()
    model = tieta.add_mctf(copy.deepcopy(plain), r=8)
    images = _images(1)
    counted = tieta.count_flops(model, images)["gmacs"] * 1e9
    assert counted == pytest.approx(_counted_macs(), rel=1e-9)
    assert counted < tieta.count_flops(plain, images)["gmacs"] * 1e9


def test_lora_before_or_after_gives_the_same_model():
    images = _images()
    first = tieta.add_mctf(randomise_parameters(tieta.add_lora(_vit(), rank=2), ("lora_B",)), r=8)
    second = tieta.add_lora(tieta.add_mctf(_vit(), r=8), rank=2)
    second.load_state_dict(first.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(second.eval()(images), first.eval()(images))
        merged = tieta.merge_lora(first)(images)
    torch.testing.assert_close(merged, second(images), rtol=1e-4, atol=1e-5)



def test_with_lora_it_projects_only_the_rows_it_uses():
    """LoRA's qkv gives MCTF q and k, then v, each alone as a plain layer does: MCTF + LoRA costs
    MCTF's FLOPs plus LoRA's own small update, not a second qkv projection in every fusing block."""
    plain, images = _vit(), _images(1)

    def gmacs(model):
        return tieta.count_flops(model, images)["gmacs"]

    mctf = gmacs(tieta.add_mctf(copy.deepcopy(plain), r=8))
    lora_update = gmacs(tieta.add_lora(copy.deepcopy(plain), rank=2)) - gmacs(plain)
    both = gmacs(tieta.add_mctf(tieta.add_lora(copy.deepcopy(plain), rank=2), r=8))
    assert mctf < both < mctf + 2 * lora_update  # the down projection runs for q, k and for v


def test_deepcopy_and_state_dict_round_trip():
    model = tieta.add_mctf(_vit(), r=8)
    images = _images()
    with torch.no_grad():
        expected = model(images)
        copied = copy.deepcopy(model)
        torch.testing.assert_close(copied(images), expected)
        assert copied.blocks[1].select.ahead is copied.mctf_ahead is not model.mctf_ahead
        fresh = tieta.add_mctf(_vit(seed=1), r=8)
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh(images), expected)
    assert set(model.state_dict()) == set(_vit().state_dict())


def test_the_objective_pulls_the_student_to_an_unreduced_teacher():
    model = tieta.add_mctf(_vit(), r=8)
    plain = _vit()
    images, labels = _images(3), torch.tensor([0, 1, 2])
    with torch.no_grad():
        logits = model(images)
        student = model.forward_head(model.forward_features(images), pre_logits=True)
        teacher = plain.forward_head(plain.forward_features(images), pre_logits=True)
        teacher_logits = plain(images)
    # teacher_r = 1: the teacher fuses nothing; threshold -1: every image counts
    loss = mctf_loss(model, images, labels, teacher_r=1, threshold=-1.0)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(teacher_logits, labels)
                + 3.0 * ((teacher - student) ** 2).mean())
    torch.testing.assert_close(loss, expected)
    assert all(step.r == 8 for step in model.modules() if isinstance(step, MultiCriteriaFusion))
    # no image above the threshold: no consistency term; no teacher weight: the plain loss
    alone = mctf_loss(model, images, labels, teacher_r=1, threshold=2.0, weights=(1.0, 0.0, 3.0))
    torch.testing.assert_close(alone, F.cross_entropy(logits, labels))
    tieta.freeze_backbone(tieta.add_lora(model, rank=2)).train()
    mctf_loss(model, images, labels).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_config_defaults_are_the_references_deit_settings():
    from tieta.train.config import load_config

    mctf = load_config(overrides={"method": "mctf"}).mctf
    assert (mctf.r, mctf.layers, mctf.tau_sim, mctf.tau_info, mctf.tau_size, mctf.bidirectional, mctf.prop_attn) == (
        16, None, 1, 20, 40, True, True)
    assert (mctf.teacher_r, mctf.threshold, mctf.student_weight, mctf.teacher_weight, mctf.consistency_weight) == (
        8, 0.4, 1, 1, 3)
    assert load_config(overrides={"method": "mctf", "mctf.r": 0.35}).mctf.r == 0.35
    with pytest.raises(tieta.TietaError, match="mctf.r"):
        load_config(overrides={"method": "mctf", "mctf.r": 2.5})


def test_refuses_bad_settings_and_a_second_token_reduction():
    with pytest.raises(tieta.TietaError, match="already reduces tokens"):
        tieta.add_mctf(tieta.add_tome(make_vit("plain"), r=2))
    with pytest.raises(tieta.TietaError, match="whole number"):
        tieta.add_mctf(make_vit("plain"), r=2.5)
    with pytest.raises(tieta.TietaError, match="layers"):
        tieta.add_mctf(make_vit("plain"), layers=[3])
    with pytest.raises(tieta.TietaError, match="layers"):
        tieta.add_mctf(make_vit("plain"), layers=[1, 1.5])
    with pytest.raises(tieta.TietaError, match="temperatures"):
        tieta.add_mctf(make_vit("plain"), tau_info=-1)


def test_exported_model_loads_with_the_same_logits(vtab_task, tmp_path):
    from tieta.deploy.export import export_run
    from tieta.train.config import load_config
    from tieta.train.fit import fit, load_run_model

    config = load_config(overrides={"model": "test_vit", "weights": "random", "img_size": 64, "optim.epochs": 1,
                                    "optim.warmup_epochs": 0, "optim.batch_size": 4, "eval_batch_size": 8,
                                    "lora.rank": 2, "data.path": str(vtab_task), "method": "mctf+lora",
                                    "mctf.r": 2})
    fit(config, tmp_path / "run")
    export_run(tmp_path / "run", tmp_path / "export")
    loaded = tieta.load(tmp_path / "export")
    trained, _, _ = load_run_model(tmp_path / "run")
    images = _images(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), trained.eval()(images), rtol=1e-4, atol=1e-5)
    assert token_counts(loaded) == [17, 15, 13, 11, 10, 10]


def test_onnx_logits_match_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tieta.deploy.onnx import check_onnx, export_onnx

    lora = randomise_parameters(tieta.add_lora(_vit(depth=2), rank=2), ("lora_B",))
    model = tieta.merge_lora(tieta.add_mctf(lora, r=8)).eval()  # block 1 fuses 65 tokens to 57
    images = _images()
    path = export_onnx(model, tmp_path / "mctf.onnx", 2, 64)
    assert check_onnx(model, path, images) < 1e-4


def test_compiles_to_one_graph_with_the_eager_logits():
    from tieta.deploy.compiled import compile_model, graph_breaks

    model = tieta.add_mctf(make_vit("registers"), r=3)  # 4 registers and a class token stay in front
    images = torch.randn(2, 3, 32, 32)
    assert graph_breaks(model, images) == 0
    compiled = compile_model(model, backend="aot_eager")  # the graph as traced, without code generation
    with torch.inference_mode():
        torch.testing.assert_close(compiled(images), model(images), rtol=0, atol=1e-5)

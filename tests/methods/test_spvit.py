"""SPViT as a method: identity when nothing is dropped and no empty package is added, the reference's
token counts, masked training equal to gathered evaluation for a fixed policy, its objective with
the unpatched model as teacher, composition with LoRA and the adapter, compile and export (copies:
test_every_method.py)."""

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import tieta
from tieta.methods import spvit
from tieta.methods.spvit import SPViTSelect, token_counts
from tieta.ops.dynamicvit import distillation_loss
from tieta.ops.spvit import ratio_loss, token_distillation_loss, top_keep
from tests.conftest import EVA_VARIANTS, VIT_VARIANTS, make_vit, randomise_parameters, tokens_entering

STAGES = dict(keep_rates=(0.75, 0.5, 0.25), locations=(0, 1, 2))  # 16 patches: 12, 8, 4 kept


def _randomised(model, seed=0):
    return randomise_parameters(model, ("selector",), seed=seed)


@pytest.mark.parametrize("variant", list(VIT_VARIANTS) + list(EVA_VARIANTS))
def test_keeping_every_token_without_empty_packages_equals_unpatched_timm(variant):
    model = make_vit(variant)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    _randomised(tieta.add_spvit(model, keep_rates=(1, 1, 1), locations=(0, 1, 2), skip_empty_package=True))
    torch.testing.assert_close(model.eval()(x), expected, rtol=1e-5, atol=1e-5)
    assert tokens_entering(model, x) == [16 + model.num_prefix_tokens] * 3


def test_by_default_an_empty_package_is_appended_as_the_reference_does():
    model = make_vit("plain")
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    _randomised(tieta.add_spvit(model, keep_rates=(1, 1, 1), locations=(0, 1, 2)))
    assert tokens_entering(model, x) == [18, 19, 20]  # a zero package per stage still joins attention
    assert not torch.allclose(model(x), expected, atol=1e-4)


@pytest.mark.parametrize("variant", ["plain", "registers", "rope_vit"])
def test_evaluation_gathers_the_top_tokens_and_appends_one_package_per_stage(variant):
    model = _randomised(tieta.add_spvit(make_vit(variant), **STAGES)).eval()
    prefix = model.num_prefix_tokens
    x = torch.randn(3, 3, 32, 32)
    expected = [prefix + 12 + 1, prefix + 8 + 2, prefix + 4 + 3]
    assert tokens_entering(model, x) == expected == token_counts(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))  # deterministic, unlike the reference's Gumbel evaluation


def test_package_mean_is_the_inference_files_plain_mean_of_the_dropped_tokens():
    model = _randomised(tieta.add_spvit(make_vit("plain"), keep_rates=(0.25,), locations=(1,), package="mean")).eval()
    seen = {}
    model.blocks[1].register_forward_pre_hook(lambda block, args: seen.setdefault("entering", args[0]))
    model.blocks[1].norm1.register_forward_hook(lambda norm, args, out: seen.setdefault("kept", args[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    entering, kept = seen["entering"], seen["kept"]  # (B, 1 + 16, D) and (B, 1 + 4 + 1, D)
    dropped_sum = entering[:, 1:].sum(dim=1) - kept[:, 1:5].sum(dim=1)
    torch.testing.assert_close(kept[:, -1], dropped_sum / 12, rtol=1e-5, atol=1e-5)


def _keeping_some(model, keep_bias=2.0):
    """Selectors with random weights and a keep bias, so that images keep different numbers of tokens."""
    torch.manual_seed(0)
    with torch.no_grad():
        for block in model.blocks:
            if isinstance(block.select, SPViTSelect):
                for param in block.select.selector.parameters():
                    if param.ndim > 1:
                        param.normal_(0, 1.0)
                block.select.selector.out_conv[-1].bias[0] = keep_bias
    return model.eval()


@pytest.mark.parametrize("variant", ["plain", "avg_pool", "rope_vit"])
def test_argmax_decisions_keep_a_count_per_image_and_padding_changes_no_logit(variant):
    model = _keeping_some(tieta.add_spvit(make_vit(variant), **STAGES, decision="argmax"))
    x = torch.randn(4, 3, 32, 32)
    alone = [tokens_entering(model, x[i:i + 1]) for i in range(4)]
    assert len({tuple(counts) for counts in alone}) > 1  # the images keep different numbers of tokens
    assert tokens_entering(model, x) == [max(column) for column in zip(*alone)]  # padded to the largest
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.cat([model(x[i:i + 1]) for i in range(4)]), rtol=1e-5, atol=1e-5)


def test_argmax_decisions_refuse_to_be_exported(monkeypatch):
    """What torch's exporter meets while tracing (``tieta export --onnx`` then names this sentence)."""
    model = tieta.add_spvit(make_vit("plain"), **STAGES, decision="argmax").eval()
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    with pytest.raises(tieta.TietaError, match="export with spvit.decision=top_k"):
        model(torch.randn(2, 3, 32, 32))


def test_token_counts_cost_and_size_of_the_reference_defaults_on_vit_b():
    with torch.device("meta"):  # shapes only: ViT-B/16 without memory or initialisation cost
        model = tieta.add_spvit(VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                                  num_classes=1000))
    images = torch.empty(1, 3, 224, 224, device="meta")
    expected = [197] * 3 + [1 + 121 + 1] * 3 + [1 + 72 + 2] * 3 + [1 + 27 + 3] * 3
    assert [i for i, block in enumerate(model.blocks) if isinstance(block.select, SPViTSelect)] == [3, 6, 9]
    assert tokens_entering(model.eval(), images) == expected == token_counts(model)
    assert round(tieta.count_flops(model, images)["gmacs"], 2) == 9.47  # plain ViT-B/16: 17.56
    assert sum(p.numel() for n, p in model.named_parameters() if "selector" in n) == 3 * 7_092
    with torch.device("meta"):
        untied = tieta.add_spvit(VisionTransformer(embed_dim=768, depth=12, num_heads=12), tied_heads=False)
    assert sum(p.numel() for n, p in untied.named_parameters() if "selector" in n) == 3 * 83_322


def test_masked_training_equals_gathered_evaluation_for_a_fixed_policy(monkeypatch):
    """With the Gumbel sample replaced by evaluation's top-k, training's masks and package tokens give
    what evaluation's gathered tokens give, up to the masked softmax's eps terms."""
    model = _randomised(tieta.add_spvit(make_vit("layerscale"), **STAGES))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        evaluated = model.eval()(x)
        steps = [block.select for block in model.blocks]

        def top_k_decision(score, previous, packages):
            patches = score.shape[1] - packages
            margin = (score[..., 0] - score[..., 1]).masked_fill(previous[..., 0] == 0, -float("inf"))
            indices = top_keep(torch.stack([margin, torch.zeros_like(margin)], -1), steps[packages].kept, patches)
            keep = torch.zeros_like(previous).scatter_(1, indices[..., None], 1.0)
            keep[:, patches:] = 1.0
            return keep

        monkeypatch.setattr(spvit, "sample_keep", top_k_decision)
        trained = model.train()(x)
    torch.testing.assert_close(trained, evaluated, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tied_heads", [True, False])
def test_training_sends_gradient_to_the_selectors_through_masks_and_packages(tied_heads):
    model = tieta.freeze_backbone(tieta.add_spvit(make_vit("plain"), **STAGES, tied_heads=tied_heads)).train()
    x, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    tieta.spvit_loss(model, x, labels, ratio_weight=0.0, distill_weight=0.0).backward()  # cross-entropy only
    grads = [p.grad for n, p in model.named_parameters() if "selector" in n and p.ndim > 1]
    assert grads and all(g is not None for g in grads) and all(g.abs().sum() > 0 for g in grads)
    assert [d.shape for d in model.spvit_state.decisions] == [(4, 16)] * 3


def test_objective_is_the_references_with_the_unpatched_model_as_teacher():
    model = _randomised(tieta.add_spvit(make_vit("plain"), **STAGES)).train()
    x, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    torch.manual_seed(3)
    loss = tieta.spvit_loss(model, x, labels, ratio_weight=2.0, distill_weight=0.5)
    assert model.training
    torch.manual_seed(3)
    logits = model(x)
    tokens, decisions = model.token_state.features[:, 1:17], model.spvit_state.decisions
    with torch.no_grad():
        teacher = make_vit("plain")  # the same weights, unpatched, in eval mode
        teacher_tokens = teacher.forward_features(x)
        teacher_logits = teacher.forward_head(teacher_tokens)
    expected = (F.cross_entropy(logits, labels) + ratio_loss(decisions, [0.75, 0.5, 0.25], 2.0)
                + 0.5 * distillation_loss(logits, teacher_logits)
                + 0.5 * token_distillation_loss(tokens, teacher_tokens[:, 1:], decisions[-1]))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("peft", ["lora", "adapter"])
def test_composes_with_lora_and_the_adapter_and_counts_fewer_flops(peft):
    def attach(model):
        return tieta.add_lora(model, rank=2) if peft == "lora" else tieta.add_adapter(model, dim=4)

    model = attach(tieta.add_spvit(make_vit("registers"), **STAGES))
    x = torch.randn(2, 3, 32, 32)
    assert tieta.count_flops(model, x)["gmacs"] < tieta.count_flops(attach(make_vit("registers")), x)["gmacs"]
    tieta.freeze_backbone(model).train()
    tieta.spvit_loss(model, x, torch.randint(0, 5, (2,))).backward()
    trained = "lora_B" if peft == "lora" else "adapter"
    assert all(p.grad is not None for n, p in model.named_parameters() if trained in n)
    assert all(p.grad is not None for n, p in model.named_parameters() if "selector" in n)


def test_compiles_to_one_graph_with_the_eager_logits():
    """Fixed token counts per stage: dynamo captures the whole pass as one graph (fullgraph fails on
    any break; the eager backend keeps the test fast, code generation is torch's own concern)."""
    from tieta.deploy.compiled import compile_model

    model = _randomised(tieta.add_spvit(make_vit("registers"), **STAGES)).eval()
    compiled = compile_model(model, backend="eager", fullgraph=True)
    with torch.inference_mode():
        for seed in (0, 1):
            batch = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
            assert torch.allclose(compiled(batch), model(batch), atol=1e-5, rtol=0)


def test_bad_settings_are_refused():
    with pytest.raises(tieta.TietaError, match="one keep rate per location"):
        tieta.add_spvit(make_vit("plain"), keep_rates=(0.9, 0.7))
    with pytest.raises(tieta.TietaError, match="cannot grow"):
        tieta.add_spvit(make_vit("plain"), keep_rates=(0.5, 0.7, 0.9))
    with pytest.raises(tieta.TietaError, match=r"in \(0, 1\]"):
        tieta.add_spvit(make_vit("plain"), keep_rates=(0.5, 0.0, 0.0))
    with pytest.raises(tieta.TietaError, match="keep no token"):
        tieta.add_spvit(make_vit("plain"), keep_rates=(0.5, 0.1, 0.01))
    with pytest.raises(tieta.TietaError, match="package"):
        tieta.add_spvit(make_vit("plain"), package="max")
    with pytest.raises(tieta.TietaError, match="decision"):
        tieta.add_spvit(make_vit("plain"), decision="sample")
    with pytest.raises(tieta.TietaError, match="already reduces tokens"):
        tieta.add_spvit(tieta.add_evit(make_vit("plain")))


def test_trains_exports_and_loads_with_the_same_logits_in_pytorch_and_onnx(vtab_task, tmp_path, capsys,
                                                                         quick_throughput):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tieta.cli import main
    from tieta.train.fit import load_run_model

    run, exported = tmp_path / "run", tmp_path / "export"
    assert main(["train", "--model", "test_vit", "--weights", "random", "--img-size", "64", "--lora-rank", "2",
                 "--method", "spvit+lora", "--spvit-keep-rate", "[0.75,0.5,0.25]", "--data", str(vtab_task),
                 "--output", str(run), "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4"]) == 0
    assert main(["export", str(run), "--output", str(exported), "--onnx", "--onnx-batch-size", "2"]) == 0
    difference = float(capsys.readouterr().out.split("onnxruntime ")[-1].split()[0])
    assert difference < 1e-4
    loaded = tieta.load(exported)
    trained, _, _ = load_run_model(run)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), trained.eval()(images), rtol=1e-4, atol=1e-5)
    # test_vit: depth 6, stages before blocks 1, 3, 4; 16 patches at 64 px
    assert tokens_entering(loaded, images) == [17, 1 + 12 + 1, 14, 1 + 8 + 2, 1 + 4 + 3, 8] == token_counts(loaded)


def test_bad_command_line_and_config_values_are_one_sentence(capsys):
    from tieta.train.config import load_config
    from tests.conftest import refused

    assert "list of numbers" in refused(capsys, "flops", "--method", "spvit", "--spvit-keep-rate", "0.5")
    with pytest.raises(tieta.TietaError, match="spvit.decision"):
        load_config(overrides={"method": "spvit", "spvit.decision": "sample"})
    with pytest.raises(tieta.TietaError, match="spvit.keep_rate"):
        load_config(overrides={"method": "spvit", "spvit.keep_rate": [0.5, 2.0]})

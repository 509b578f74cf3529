"""DynamicViT as a method: identity at ratio 1, the spec's evaluation token counts, masked training
equal to gathered evaluation for a fixed policy, its loss, and composition with LoRA."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tieta
from tieta.methods import dynamicvit
from tieta.methods.dynamicvit import DynamicViTSelect, token_counts
from tieta.ops.dynamicvit import top_keep
from tests.conftest import make_vit, tokens_entering


def _randomise_predictors(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "predictor" in name and param.ndim > 1:
                param.normal_(0, 0.3)
    return model


def test_ratio_one_equals_unpatched_timm(vit_variant):
    model = make_vit(vit_variant)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    _randomise_predictors(tieta.add_dynamicvit(model, ratios=(1, 1, 1), locations=(0, 1, 2)))
    # every token kept, in score order: the same function up to the order of sums
    torch.testing.assert_close(model.eval()(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratios,patches", [
    ((0.9, 0.7, 0.5), [196] * 3 + [176] * 3 + [137] * 3 + [98] * 3),
    ((0.7, 0.49, 0.343), [196] * 3 + [137] * 3 + [96] * 3 + [67] * 3),
])
def test_evaluation_token_counts_of_the_spec(ratios, patches):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=48, depth=12, num_heads=3, num_classes=10)
    tieta.add_dynamicvit(model.eval(), ratios=ratios)
    expected = [1 + n for n in patches]
    assert tokens_entering(model, torch.randn(1, 3, 224, 224)) == expected
    assert token_counts(model) == expected


def test_masked_training_equals_gathered_evaluation_for_a_fixed_policy(monkeypatch):
    """With the Gumbel sample replaced by evaluation's top-K, training's masked attention gives the
    class token what evaluation's physically gathered tokens give, up to the eps terms."""
    model = _randomise_predictors(tieta.add_dynamicvit(make_vit("layerscale"), ratios=(0.75, 0.5, 0.25),
                                                       locations=(0, 1, 2)))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        evaluated = model.eval()(x)

        def top_k_decision(log_probs, previous):
            kept = int(16 * model.blocks[len(decisions)].select.ratio)
            keep = torch.zeros_like(previous)
            scores = log_probs[..., 0].masked_fill(previous[..., 0] == 0, -float("inf"))
            decisions.append(keep.scatter_(1, top_keep(scores[..., None].expand(-1, -1, 2), kept)[..., None], 1.0))
            return decisions[-1]

        decisions = []
        monkeypatch.setattr(dynamicvit, "sample_keep", top_k_decision)
        trained = model.train()(x)
    torch.testing.assert_close(trained, evaluated, rtol=1e-4, atol=1e-4)


def test_training_sends_gradient_to_the_predictors_through_the_masks():
    model = tieta.freeze_backbone(tieta.add_dynamicvit(make_vit("plain"), locations=(0, 1, 2))).train()
    x, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    tieta.dynamicvit_loss(model, x, labels, ratio_weight=0.0).backward()  # cross-entropy only
    grads = [p.grad for n, p in model.named_parameters() if "predictor" in n and p.ndim > 1]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert len(model.pruning_state.decisions) == 3


def test_loss_is_cross_entropy_plus_the_ratio_term():
    from tieta.ops.dynamicvit import ratio_loss

    model = tieta.add_dynamicvit(make_vit("plain"), ratios=(0.9, 0.7, 0.5), locations=(0, 1, 2)).train()
    x, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    torch.manual_seed(3)
    loss = tieta.dynamicvit_loss(model, x, labels)
    torch.manual_seed(3)
    logits = model(x)
    expected = torch.nn.functional.cross_entropy(logits, labels) + ratio_loss(model.pruning_state.decisions,
                                                                              [0.9, 0.7, 0.5], 2.0)
    torch.testing.assert_close(loss, expected)


def test_composes_with_lora_and_counts_fewer_flops(vit_variant):
    model = tieta.add_lora(tieta.add_dynamicvit(make_vit(vit_variant), ratios=(0.5, 0.25), locations=(1, 2)), rank=2)
    x = torch.randn(2, 3, 32, 32)
    dense = tieta.add_lora(make_vit(vit_variant), rank=2)
    assert tieta.count_flops(model, x)["gmacs"] < tieta.count_flops(dense, x)["gmacs"]
    tieta.freeze_backbone(model).train()
    tieta.dynamicvit_loss(model, x, torch.randint(0, 5, (2,))).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
    assert all(isinstance(model.blocks[i].select, DynamicViTSelect) for i in (1, 2))


def test_bad_settings_are_refused():
    with pytest.raises(tieta.TietaError, match="one ratio per location"):
        tieta.add_dynamicvit(make_vit("plain"), ratios=(0.9, 0.7))
    with pytest.raises(tieta.TietaError, match="cannot grow"):
        tieta.add_dynamicvit(make_vit("plain"), ratios=(0.5, 0.7, 0.9))
    with pytest.raises(tieta.TietaError, match="keeps no token of 16 patches"):  # int(16 * 0.05) = 0
        tieta.add_dynamicvit(make_vit("plain"), ratios=(0.5, 0.3, 0.05))
    with pytest.raises(tieta.TietaError, match="own loss"):
        from tieta.train.config import load_config

        load_config(overrides={"method": "dynamicvit+dyt"})

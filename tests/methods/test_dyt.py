import pytest
import torch
import torch.nn.functional as F

import tieta
from tieta import TietaError
from tieta.methods.adapter import Adapter, MoEAdapter
from tieta.methods.dyt import VARIANTS, activation_rates, add_dyt, dispatch_mask, dyt_forward, dyt_loss
from tests.conftest import make_vit

def _assert_real_skipping_equals_masked(model, x):
    with torch.no_grad():
        model.dispatch_state.real_skip = False
        masked = model(x)
        model.dispatch_state.real_skip = True
        torch.testing.assert_close(model(x), masked, rtol=1e-5, atol=1e-5)


def _randomise(model, seed=0):
    """Trained-looking DyT: non-zero adapters and dispatchers that keep about half the tokens."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter" in name or "dispatcher" in name:
                param.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [1, 4])
def test_real_skipping_equals_masked_computation(vit_variant, variant, batch):
    model = _randomise(add_dyt(make_vit(vit_variant), variant=variant, adapter_dim=4))
    x = torch.randn(batch, 3, 32, 32)
    rates = activation_rates(model, x)
    assert 0 < min(rates) and max(rates) < 1, "the test needs some skipped and some active tokens"
    _assert_real_skipping_equals_masked(model, x)


def test_full_network_is_the_dense_adapter_model(vit_variant):
    dyt = _randomise(add_dyt(make_vit(vit_variant), adapter_dim=4))
    dense = tieta.add_adapter(make_vit(vit_variant), dim=4)
    dense.load_state_dict({k: v for k, v in dyt.state_dict().items() if "dispatcher" not in k})
    x = torch.randn(2, 3, 32, 32)
    dyt.dispatch_state.full = True
    torch.testing.assert_close(dyt(x), dense.eval()(x))


def test_dispatch_mask_rules():
    logits = torch.tensor([[-2.0, -0.1, 0.1, 3.0]])
    assert dispatch_mask(logits, 5.0, training=False).tolist() == [[0, 0, 1, 1]]
    torch.manual_seed(0)
    logits = torch.randn(64, 50, requires_grad=True)
    mask = dispatch_mask(logits, 5.0, training=True)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    mask.sum().backward()
    assert (logits.grad > 0).all()  # the straight-through gradient is the soft sigmoid's
    with torch.no_grad():  # Gumbel noise: a token with logit 0 is active about half of the time
        share = dispatch_mask(torch.zeros(200, 200), 5.0, training=True).mean()
    assert 0.45 < share < 0.55


def test_prefix_tokens_are_always_active():
    model = add_dyt(make_vit("registers"), variant="layer")
    with torch.no_grad():
        for block in model.blocks:
            block.dispatcher.bias.fill_(-100)  # every patch token inactive
    x = torch.randn(2, 3, 32, 32)
    rates = activation_rates(model, x)
    assert rates == [0.0, 0.0, 0.0]
    assert all(mask.shape == (2, 16) for mask in model.dispatch_state.masks)
    assert torch.isfinite(model(x)).all()


def test_dyt_loss_formula():
    torch.manual_seed(0)
    logits, full, targets = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    masks = [torch.rand(4, 16), torch.rand(4, 16)]
    outputs = tieta.methods.dyt.DyTOutputs(logits, full, masks)
    rate = torch.cat([m.flatten() for m in masks]).mean()
    p_full = full.softmax(-1)
    kl = (p_full * (p_full.log() - logits.log_softmax(-1))).sum(-1).mean()
    expected = F.cross_entropy(logits, targets) + 2.0 * (rate - 0.3) ** 2 + F.cross_entropy(full, targets) + kl
    torch.testing.assert_close(dyt_loss(outputs, targets, rho=0.3), expected)


def test_training_step_reaches_dispatchers_and_adapters():
    model = tieta.freeze_backbone(add_dyt(make_vit("plain"), variant="attn_mlp"))
    model.train()
    outputs = dyt_forward(model, torch.randn(4, 3, 32, 32))
    assert len(outputs.masks) == 6 and not model.dispatch_state.full
    dyt_loss(outputs, torch.randint(0, 5, (4,)), rho=model.dyt_rho).backward()
    for name, param in model.named_parameters():
        if "dispatcher" in name or "adapter.up" in name:  # (down gets no gradient while up is 0)
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_moe_adapter_mixes_expert_weights_per_image():
    torch.manual_seed(0)
    moe = MoEAdapter(12, dim=3, experts=3, dropout=0.0)
    assert moe(torch.randn(2, 5, 12)).abs().sum() == 0  # up = 0 at initialisation
    with torch.no_grad():
        moe.up_weight.normal_()
        moe.up_bias.normal_()
        moe.router.weight.zero_()
        moe.router.bias.copy_(torch.tensor([0.0, 100.0, 0.0]))  # the router picks expert 1
    single = Adapter(12, 3, dropout=0.0)
    with torch.no_grad():
        single.down.weight.copy_(moe.down_weight[1])
        single.down.bias.copy_(moe.down_bias[1])
        single.up.weight.copy_(moe.up_weight[1])
        single.up.bias.copy_(moe.up_bias[1])
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(moe(x), single(x))


def test_moe_variant_counts_and_skips():
    model = _randomise(add_dyt(make_vit("plain"), experts=4, adapter_dim=4))
    assert isinstance(model.blocks[0].adapter, MoEAdapter)
    _assert_real_skipping_equals_masked(model, torch.randn(3, 3, 32, 32))


def test_flops_count_the_executed_path():
    model = _randomise(add_dyt(make_vit("plain"), adapter_dim=4))
    x = torch.randn(4, 3, 32, 32)
    rates = activation_rates(model, x)
    dense = tieta.add_adapter(make_vit("plain"), dim=4)
    skipped_tokens = sum((1 - rate) * 16 for rate in rates)  # patch tokens per image, averaged
    mlp_macs = 2 * 48 * 192
    dispatcher_macs = 3 * 16 * 48
    expected = tieta.count_flops(dense, x)["gmacs"] * 1e9 - skipped_tokens * mlp_macs + dispatcher_macs
    assert tieta.count_flops(model, x)["gmacs"] * 1e9 == pytest.approx(expected)


def test_with_tome_merging_and_dispatch_share_blocks():
    model = _randomise(tieta.add_tome(add_dyt(make_vit("plain"), adapter_dim=4), r=[3, 2, 1]))
    _assert_real_skipping_equals_masked(model, torch.randn(3, 3, 32, 32))
    assert [m.shape[1] for m in model.dispatch_state.masks] == [13, 11, 10]  # dispatch after each merge
    with pytest.raises(TietaError, match="merging"):
        tieta.add_tome(add_dyt(make_vit("plain"), variant="attn"), r=2)


def test_bad_arguments():
    with pytest.raises(TietaError, match="variant"):
        add_dyt(make_vit("plain"), variant="token")
    with pytest.raises(TietaError, match="rho"):
        add_dyt(make_vit("plain"), rho=0)
    with pytest.raises(TietaError, match="own adapter"):
        add_dyt(tieta.add_adapter(make_vit("plain")))

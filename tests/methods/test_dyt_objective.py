"""DyT's loss trains toward the rho the model was built with, without passing it again."""

import torch
import torch.nn.functional as F

import tieta
from tests.conftest import make_vit


def test_dyt_loss_uses_the_models_rho():
    model = tieta.add_dyt(make_vit("plain"), rho=0.3, adapter_dim=4).train()
    x, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    torch.manual_seed(0)
    outputs = tieta.dyt_forward(model, x)
    assert outputs.rho == 0.3
    rate = torch.cat([mask.reshape(-1) for mask in outputs.masks]).mean()
    p_full = outputs.full_logits.detach().softmax(-1)
    kl = (p_full * (p_full.log() - outputs.logits.log_softmax(-1))).sum(-1).mean()
    expected = (F.cross_entropy(outputs.logits, labels) + 2.0 * (rate - 0.3) ** 2
                + F.cross_entropy(outputs.full_logits, labels) + kl)
    torch.testing.assert_close(tieta.dyt_loss(outputs, labels), expected)


def test_training_objective_follows_the_configured_rho():
    from tieta.train.config import load_config
    from tieta.train.fit import training_objective
    from tieta.train.model import apply_methods

    config = load_config(overrides={"method": "dyt", "dyt.rho": 0.3})
    model = apply_methods(make_vit("plain"), config).train()
    assert model.dyt_rho == 0.3
    x, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))
    torch.manual_seed(0)
    loss = training_objective(config)(model, x, labels)
    torch.manual_seed(0)
    assert torch.allclose(loss, tieta.dyt_loss(tieta.dyt_forward(model, x), labels, rho=0.3))

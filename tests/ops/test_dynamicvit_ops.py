import math

import pytest
import torch
from torch import nn

from tieta.ops.dynamicvit import (
    PredictorLG,
    distillation_loss,
    gather_tokens,
    keep_counts,
    ratio_loss,
    sample_keep,
    top_keep,
)


# DynamicViT's token distillation term (the reference's, against a separate teacher's tokens); tieta's
# self-distillation uses the class term alone (distillation_loss), so the term is defined here, with its tests
def token_distillation_loss(tokens: torch.Tensor, teacher_tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean squared error between student and teacher patch tokens, over the kept tokens only.

    Args:
        tokens: (B, P, D) the student's final-norm patch tokens.
        teacher_tokens: (B, P, D) the teacher's, detached by the caller.
        keep: (B, P, 1) or (B, P) the last stage's decisions; a token counts where it is > 0.5.

    Returns:
        Scalar: the mean over the (#kept * D) entries, 0 when no token is kept.
    """
    kept = (keep.reshape(tokens.shape[:2]) > 0.5).unsqueeze(-1)  # (B, P, 1), no gradient
    squared = torch.where(kept, (tokens - teacher_tokens) ** 2, tokens.new_zeros(()))
    # Dividing by at least 1 gives 0 when nothing is kept, without a host sync to test for it.
    entries = (kept.sum() * tokens.shape[-1]).clamp_min(1)
    return squared.sum() / entries


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def perturbed_predictor(dim: int, seed: int = 0) -> PredictorLG:
    """A float64 predictor whose every parameter is moved off its initial value, so that a wrong
    layer order, split or normalisation shows in the output."""
    torch.manual_seed(seed)
    predictor = PredictorLG(dim).double()
    with torch.no_grad():
        for parameter in predictor.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return predictor


def reference_predictor(predictor: PredictorLG, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """A direct, slow transcription of the spec's prediction module, one token at a time.

    Args: x (B, P, D), policy (B, P, 1). Returns (B, P, 2) log-probabilities, channel 0 = keep.
    """
    norm = next(m for m in predictor.modules() if isinstance(m, nn.LayerNorm))
    fc_in, fc_1, fc_2, fc_out = [m for m in predictor.modules() if isinstance(m, nn.Linear)]
    gelu = lambda v: 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))
    linear = lambda layer, v: layer.weight @ v + layer.bias
    batch, patches, dim = x.shape
    half = dim // 2
    out = torch.empty(batch, patches, 2, dtype=x.dtype)
    for b in range(batch):
        z = []
        for i in range(patches):
            token = x[b, i]
            mean = token.mean()
            var = ((token - mean) ** 2).mean()
            normed = (token - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
            z.append(gelu(linear(fc_in, normed)))
        weight_sum = sum(float(policy[b, i, 0]) for i in range(patches))
        global_half = sum(float(policy[b, i, 0]) * z[i][half:] for i in range(patches)) / weight_sum
        for i in range(patches):
            h = torch.cat([z[i][:half], global_half])
            h = linear(fc_out, gelu(linear(fc_2, gelu(linear(fc_1, h)))))
            out[b, i] = h - torch.log(torch.exp(h).sum())
    return out


# --- PredictorLG ---------------------------------------------------------------------------------


def test_predictor_outputs_log_probabilities():
    torch.manual_seed(0)
    predictor = PredictorLG(32)
    out = predictor(torch.randn(3, 10, 32), torch.ones(3, 10, 1))
    assert out.shape == (3, 10, 2)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3, 10))


@pytest.mark.parametrize("dim, expected", [(768, 961_730), (384, 241_250), (1024, 1_708_290)])
def test_predictor_parameter_count(dim, expected):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        predictor = PredictorLG(dim)
    assert count_parameters(predictor) == expected == int(1.625 * dim**2 + 4.25 * dim + 2)


def test_predictor_initialisation():
    torch.manual_seed(0)
    predictor = PredictorLG(384)
    norms = [m for m in predictor.modules() if isinstance(m, nn.LayerNorm)]
    linears = [m for m in predictor.modules() if isinstance(m, nn.Linear)]
    assert len(norms) == 1 and len(linears) == 4
    assert torch.equal(norms[0].weight, torch.ones(384)) and torch.equal(norms[0].bias, torch.zeros(384))
    for layer in linears:
        assert torch.count_nonzero(layer.bias) == 0
    weights = torch.cat([layer.weight.flatten() for layer in linears[:3]])  # the last has only 192 * 2
    assert abs(weights.std().item() - 0.02) < 1e-3
    assert abs(weights.mean().item()) < 1e-3


@pytest.mark.parametrize("dim", [16, 20])
def test_predictor_matches_transcription(dim):
    predictor = perturbed_predictor(dim)
    torch.manual_seed(1)
    x = torch.randn(2, 7, dim, dtype=torch.float64)
    policy = torch.tensor([[1, 0, 1, 1, 0, 0, 1], [0, 1, 1, 0, 1, 1, 1]], dtype=torch.float64)[..., None]
    torch.testing.assert_close(predictor(x, policy), reference_predictor(predictor, x, policy))


def test_predictor_global_half_ignores_dropped_tokens():
    predictor = perturbed_predictor(16)
    torch.manual_seed(2)
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    policy = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.float64).view(1, 6, 1)
    changed = x.clone()
    changed[:, policy[0, :, 0] == 0] += 5.0 * torch.randn(1, 2, 16, dtype=torch.float64)
    kept = policy[0, :, 0] == 1
    torch.testing.assert_close(predictor(changed, policy)[:, kept], predictor(x, policy)[:, kept])
    assert not torch.allclose(predictor(changed, torch.ones_like(policy)), predictor(x, torch.ones_like(policy)))


def test_predictor_survives_an_image_with_no_token_left():
    torch.manual_seed(0)
    out = PredictorLG(16)(torch.randn(2, 5, 16), torch.zeros(2, 5, 1))
    assert torch.isfinite(out).all()


# --- keep counts ---------------------------------------------------------------------------------


def test_keep_counts_geometric():
    assert keep_counts(196, [0.7, 0.49, 0.343]) == [137, 96, 67]
    assert keep_counts(196, [0.7, 0.7**2, 0.7**3]) == [137, 96, 67]


def test_keep_counts_linear_uses_python_float_arithmetic():
    rho = 0.9
    assert keep_counts(196, [rho, rho - 0.2, rho - 0.4]) == [176, 137, 98]
    assert keep_counts(196, [0.9, 0.7, 0.5]) == [176, 137, 98]


def test_keep_counts_all_kept():
    assert keep_counts(196, [1.0, 1.0, 1.0]) == [196, 196, 196]


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, 0.001])
def test_keep_counts_rejects_unusable_ratios(ratio):
    with pytest.raises(ValueError):
        keep_counts(196, [0.7, ratio])


# --- training decision ---------------------------------------------------------------------------


def test_sample_keep_is_hard_and_never_revives_a_token():
    torch.manual_seed(0)
    log_probs = torch.randn(4, 50, 2).log_softmax(-1)
    previous = (torch.rand(4, 50, 1) > 0.4).float()
    decision = sample_keep(log_probs, previous)
    assert decision.shape == (4, 50, 1)
    assert set(decision.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(decision[previous == 0] == 0)
    assert 0 < decision.sum() < previous.sum()  # some kept tokens were dropped now, not all


def test_sample_keep_keeps_with_the_probability_of_channel_zero():
    torch.manual_seed(0)
    keep_probability = torch.tensor([0.1, 0.5, 0.9])
    log_probs = torch.stack([keep_probability.log(), (1 - keep_probability).log()], dim=-1)
    log_probs = log_probs.expand(20_000, 3, 2)
    frequency = sample_keep(log_probs, torch.ones(20_000, 3, 1)).mean(dim=0)[:, 0]
    torch.testing.assert_close(frequency, keep_probability, atol=0.015, rtol=0)


def test_sample_keep_passes_a_straight_through_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 2, requires_grad=True)
    decision = sample_keep(logits.log_softmax(-1), torch.ones(2, 8, 1))
    (decision * torch.randn(2, 8, 1)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# --- evaluation decision and gathering -----------------------------------------------------------


def test_top_keep_is_the_top_k_of_channel_zero_best_first():
    torch.manual_seed(0)
    log_probs = torch.randn(3, 20, 2).log_softmax(-1)
    indices = top_keep(log_probs, 7)
    assert indices.shape == (3, 7)
    for b in range(3):
        scores = log_probs[b, :, 0].tolist()
        expected = sorted(range(20), key=lambda i: scores[i], reverse=True)[:7]
        assert indices[b].tolist() == expected
        assert log_probs[b, indices[b], 0].diff().le(0).all()


@pytest.mark.parametrize("num_prefix", [0, 1, 5])
def test_gather_tokens_puts_the_prefix_first(num_prefix):
    torch.manual_seed(0)
    x = torch.randn(2, num_prefix + 9, 4)
    indices = torch.tensor([[8, 0, 3], [2, 7, 5]])
    out = gather_tokens(x, indices, num_prefix)
    assert out.shape == (2, num_prefix + 3, 4)
    for b in range(2):
        expected = [x[b, i] for i in range(num_prefix)] + [x[b, num_prefix + int(j)] for j in indices[b]]
        torch.testing.assert_close(out[b], torch.stack(expected), rtol=0, atol=0)


def test_evaluation_step_keeps_the_best_tokens_and_an_all_ones_policy():
    torch.manual_seed(0)
    log_probs = torch.randn(2, 10, 2).log_softmax(-1)
    x = torch.arange(2 * 11, dtype=torch.float32).view(2, 11, 1)  # token value = its position
    indices = top_keep(log_probs, keep_counts(10, [0.5])[0])
    kept = gather_tokens(x, indices, num_prefix=1)
    assert torch.equal(kept[:, 0], x[:, 0])
    assert torch.equal(kept[:, 1:, 0] - x[:, :1, 0], (indices + 1).float())
    policy = gather_tokens(torch.ones(2, 10, 1), indices, num_prefix=0)  # the decisions, as gathered
    assert torch.equal(policy, torch.ones(2, 5, 1))


# --- losses --------------------------------------------------------------------------------------


def reference_ratio_loss(decisions, ratios, weight):
    """The spec's formula with explicit loops: (w / S) * sum_s mean_b (r_s - mean_i p_s[b, i])^2."""
    total = 0.0
    for decision, ratio in zip(decisions, ratios):
        batch, patches = decision.shape
        per_image = [(ratio - sum(float(decision[b, i]) for i in range(patches)) / patches) ** 2 for b in range(batch)]
        total += sum(per_image) / batch
    return weight / len(decisions) * total


@pytest.mark.parametrize("weight", [2.0, 5.0])
def test_ratio_loss_all_kept(weight):
    ratios = [0.7, 0.49, 0.343]
    decisions = [torch.ones(4, 196) for _ in ratios]
    expected = weight / 3 * sum((1 - r) ** 2 for r in ratios)
    torch.testing.assert_close(ratio_loss(decisions, ratios, weight), torch.tensor(expected))


def test_ratio_loss_is_per_image_not_per_batch():
    # image 0 keeps everything, image 1 nothing: the batch keeps half, exactly on target, but each
    # image is 0.5 away from it
    decision = torch.stack([torch.ones(10), torch.zeros(10)])
    torch.testing.assert_close(ratio_loss([decision], [0.5], weight=2.0), torch.tensor(2.0 * 0.25))
    assert ratio_loss([torch.full((2, 10), 0.5)], [0.5]) == 0


def test_ratio_loss_matches_transcription():
    torch.manual_seed(0)
    ratios = [0.9, 0.7, 0.5]
    decisions = [(torch.rand(3, 12) < r).float() for r in ratios]
    expected = reference_ratio_loss(decisions, ratios, 2.0)
    torch.testing.assert_close(ratio_loss(decisions, ratios), torch.tensor(expected))
    column_shaped = [d[..., None] for d in decisions]  # (B, P, 1), as the decisions come out
    torch.testing.assert_close(ratio_loss(column_shaped, ratios), torch.tensor(expected))


def test_ratio_loss_needs_one_ratio_per_stage():
    with pytest.raises(ValueError):
        ratio_loss([torch.ones(2, 4)] * 2, [0.7, 0.49, 0.343])
    with pytest.raises(ValueError):
        ratio_loss([], [])


def test_distillation_loss_is_kl_of_teacher_to_student():
    torch.manual_seed(0)
    logits, teacher = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    student_p, teacher_p = logits.softmax(-1), teacher.softmax(-1)
    expected = sum(
        float(teacher_p[b, c] * (teacher_p[b, c].log() - student_p[b, c].log())) for b in range(4) for c in range(10)
    ) / 4
    torch.testing.assert_close(distillation_loss(logits, teacher), torch.tensor(expected, dtype=torch.float64))
    assert distillation_loss(teacher, teacher).abs() < 1e-12


def test_token_distillation_loss_is_the_mse_of_kept_tokens():
    torch.manual_seed(0)
    tokens, teacher = torch.randn(2, 6, 4, requires_grad=True), torch.randn(2, 6, 4)
    keep = torch.tensor([[1, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.float32)[..., None]
    kept_pairs = [(b, i) for b in range(2) for i in range(6) if keep[b, i, 0] == 1]
    expected = sum(((tokens[b, i] - teacher[b, i]) ** 2).sum() for b, i in kept_pairs) / (len(kept_pairs) * 4)
    loss = token_distillation_loss(tokens, teacher, keep)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(token_distillation_loss(tokens, teacher, keep[..., 0]), expected)
    loss.backward()
    assert torch.all(tokens.grad[keep[..., 0] == 0] == 0)
    assert torch.all(tokens.grad[keep[..., 0] == 1] != 0)


def test_token_distillation_loss_is_zero_when_nothing_is_kept():
    torch.manual_seed(0)
    loss = token_distillation_loss(torch.randn(2, 6, 4), torch.randn(2, 6, 4), torch.zeros(2, 6, 1))
    assert loss.shape == () and loss == 0

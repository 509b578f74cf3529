"""SPViT's tensor operations against a literal transcription of the reference code
(``PeiyanFlying/SPViT`` @a1f9423: ``MultiheadPredictorLG`` and the pruning part of
``VisionTransformerDiffPruning.forward`` in ``vit_l2_3keep_senet.py``, ``DistillDiffPruningLoss`` in
``losses_l2.py``)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tieta.ops import dynamicvit as dynamicvit_ops
from tieta.ops.spvit import (MultiheadPredictorLG, argmax_keep, keep_counts, pack_kept, package_token, ratio_loss,
                             sample_keep, token_distillation_loss, top_keep)


def perturbed_selector(dim: int, heads: int, seed: int = 0, tied: bool = True) -> MultiheadPredictorLG:
    """A float64 selector whose every parameter is moved off its initial value, so that a wrong
    layer order, head split or weighting shows in the output."""
    torch.manual_seed(seed)
    selector = MultiheadPredictorLG(dim, heads, tied).double()
    with torch.no_grad():
        for parameter in selector.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return selector


def reference_selector(selector: MultiheadPredictorLG, x: torch.Tensor, policy: torch.Tensor):
    """``MultiheadPredictorLG.forward`` as the reference writes it: a loop over the heads, each head
    through ``in_conv[i]`` and ``out_conv[i]`` (the same module for every i, as the reference builds
    them; head i's own with untied heads), weighted by the SE gate.

    Args: x (B, n, D), policy (B, n, 1). Returns (multihead_score, multihead_softmax_score), (B, n, 2).
    """
    num_heads, embed_dim = selector.heads, selector.dim
    in_conv = [selector.in_conv for _ in range(num_heads)] if selector.tied else selector.in_conv
    out_conv = [selector.out_conv for _ in range(num_heads)] if selector.tied else selector.out_conv
    multihead_score = 0
    multihead_softmax_score = 0
    _, n, _ = x.size()
    x_head = nn.AdaptiveAvgPool2d((n, num_heads))(x)
    head_weights = selector.senet(x_head)
    head_weights_sum = torch.unsqueeze(torch.sum(head_weights, dim=2), dim=2)
    for i in range(num_heads):
        x_single = x[:, :, embed_dim // num_heads * i:embed_dim // num_heads * (i + 1)]
        x_single = in_conv[i](x_single)
        B, N, C = x_single.size()
        local_x = x_single[:, :, :C // 2]
        global_x = (x_single[:, :, C // 2:] * policy).sum(dim=1, keepdim=True) / torch.sum(policy, dim=1, keepdim=True)
        x_single = torch.cat([local_x, global_x.expand(B, N, C // 2)], dim=-1)
        x_single = out_conv[i](x_single)
        score_softmax = nn.Softmax(dim=-1)(x_single) * head_weights[:, :, i:i + 1]
        multihead_softmax_score += score_softmax
        score_single = nn.LogSoftmax(dim=-1)(x_single) * head_weights[:, :, i:i + 1]
        multihead_score += score_single
    multihead_softmax_score = multihead_softmax_score / head_weights_sum
    multihead_score = multihead_score / head_weights_sum
    return multihead_score, multihead_softmax_score


def reference_pruning(selectors, blocks, x: torch.Tensor, pruning_loc):
    """The pruning part of the reference's training forward, as written (one class token, init_n the
    patches of ``x``); ``blocks[i](x, policy)`` stands for the transformer block.

    Returns: (x after the last block, [hard_keep_decision per stage] (B, P), the last policy)."""
    B = x.shape[0]
    init_n = x.shape[1] - 1
    p_count = 0
    out_pred_prob = []
    policy = torch.ones(B, init_n + 1, 1, dtype=x.dtype)
    prev_decision = torch.ones(B, init_n, 1, dtype=x.dtype)
    for i, blk in enumerate(blocks):
        if i in pruning_loc:
            spatial_x = x[:, 1:]
            if i != pruning_loc[0]:
                rep_decision = torch.ones(B, p_count, 1, dtype=x.dtype)
                prev_decision = torch.cat([prev_decision, rep_decision], dim=1)
            pred_score, softmax_score = selectors[p_count](spatial_x, prev_decision)
            pred_score = pred_score.reshape(B, -1, 2)
            softmax_score = softmax_score.reshape(B, -1, 2)
            if i == pruning_loc[0]:
                hard_keep_decision = F.gumbel_softmax(pred_score, hard=True)[:, :, 0:1] * prev_decision
                hard_drop_decision = (1 - hard_keep_decision) - (1 - prev_decision)
            else:
                hard_keep_decision_all = F.gumbel_softmax(pred_score, hard=True)[:, :, 0:1] * prev_decision
                hard_keep_decision = torch.cat([hard_keep_decision_all[:, :-p_count], rep_decision], dim=1)
                hard_drop_decision = (1 - hard_keep_decision) - (1 - prev_decision)
            softmax_score = softmax_score[:, :, 0:1]
            placeholder_score = softmax_score * hard_drop_decision
            x2 = spatial_x * placeholder_score
            x2_sum = torch.unsqueeze(torch.sum(x2, dim=1), dim=1)
            represent_token = x2_sum
            x = torch.cat((x, represent_token), dim=1)
            if i != pruning_loc[0]:
                hard_keep_decision = hard_keep_decision[:, :-p_count]
            out_pred_prob.append(hard_keep_decision.reshape(B, init_n))
            cls_policy = torch.ones(B, 1, 1, dtype=hard_keep_decision.dtype)
            rep_policy = torch.ones(B, (p_count + 1), 1, dtype=hard_keep_decision.dtype)
            policy = torch.cat([cls_policy, hard_keep_decision, rep_policy], dim=1)
            x = blk(x, policy)
            prev_decision = hard_keep_decision
            p_count += 1
        else:
            x = blk(x, policy)
    return x, out_pred_prob, policy


def tieta_pruning(selectors, blocks, x: torch.Tensor, pruning_loc):
    """The same pass with tieta's operations (what ``SPViTSelect`` does in training)."""
    policy, decisions, packages = None, [], 0
    for i, blk in enumerate(blocks):
        if i in pruning_loc:
            rest = x[:, 1:]
            previous = torch.ones_like(rest[..., :1]) if policy is None else policy[:, 1:, None]
            score, prob = selectors[packages](rest, previous)
            keep = sample_keep(score, previous, packages)
            package = package_token(rest, prob, previous - keep)
            decisions.append(keep[:, :rest.shape[1] - packages, 0])
            policy = torch.cat([keep.new_ones(x.shape[0], 1), keep[..., 0], keep.new_ones(x.shape[0], 1)], dim=1)
            x = torch.cat([x, package], dim=1)
            packages += 1
        x = blk(x, None if policy is None else policy[..., None])
    return x, decisions, policy


def token_mixer(dim: int, seed: int):
    """A stand-in block that mixes the unmasked tokens, so that stages see changed tokens."""
    weight = torch.randn(dim, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) / dim ** 0.5

    def block(x, policy):
        mask = torch.ones_like(x[..., :1]) if policy is None else policy
        return x + torch.tanh(x @ weight) + (x * mask).mean(dim=1, keepdim=True)
    return block


# --- the selector ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dim,heads,tied", [(48, 3, True), (64, 4, True), (32, 2, True), (48, 3, False)])
def test_selector_matches_the_reference_forward(dim, heads, tied):
    selector = perturbed_selector(dim, heads, tied=tied)
    x = torch.randn(3, 11, dim, dtype=torch.float64)
    policy = (torch.rand(3, 11, 1) > 0.3).double()
    policy[:, 0] = 1.0
    score, prob = selector(x, policy)
    expected_score, expected_prob = reference_selector(selector, x, policy)
    torch.testing.assert_close(score, expected_score)
    torch.testing.assert_close(prob, expected_prob)


def test_selector_outputs_and_head_weights():
    torch.manual_seed(0)
    selector = MultiheadPredictorLG(48, 3)
    x = torch.randn(2, 9, 48)
    score, prob = selector(x, torch.ones(2, 9, 1))
    assert score.shape == prob.shape == (2, 9, 2)
    torch.testing.assert_close(prob.sum(-1), torch.ones(2, 9))
    gate = selector.senet(x.reshape(2, 9, 3, 16).mean(-1))
    assert ((gate > 0) & (gate < 1)).all()


@pytest.mark.parametrize("dim,heads,tied,expected", [(768, 12, True, 7_092), (384, 6, True, 6_975),
                                                     (768, 12, False, 83_322), (384, 6, False, 41_625)])
def test_selector_parameter_count_tied_as_in_the_reference_or_untied(dim, heads, tied, expected):
    with torch.device("meta"):
        selector = MultiheadPredictorLG(dim, heads, tied)
    assert sum(p.numel() for p in selector.parameters()) == expected


def test_untied_heads_with_equal_weights_are_the_tied_selector():
    tied = perturbed_selector(48, 3)
    untied = MultiheadPredictorLG(48, 3, tied=False).double()
    untied.senet.load_state_dict(tied.senet.state_dict())
    for in_conv, out_conv in zip(untied.in_conv, untied.out_conv):
        in_conv.load_state_dict(tied.in_conv.state_dict())
        out_conv.load_state_dict(tied.out_conv.state_dict())
    x, policy = torch.randn(2, 7, 48, dtype=torch.float64), torch.ones(2, 7, 1, dtype=torch.float64)
    for got, expected in zip(untied(x, policy), tied(x, policy)):
        torch.testing.assert_close(got, expected)


# --- the training pass: decisions and package tokens ----------------------------------------------------


def test_three_stages_match_the_reference_training_forward():
    dim, heads = 48, 3
    selectors = [perturbed_selector(dim, heads, seed) for seed in range(3)]
    blocks = [token_mixer(dim, seed) for seed in range(8)]
    x = torch.randn(4, 1 + 16, dim, dtype=torch.float64)
    torch.manual_seed(5)  # the same Gumbel noise for both
    expected, expected_decisions, expected_policy = reference_pruning(selectors, blocks, x, [2, 4, 6])
    torch.manual_seed(5)
    got, decisions, policy = tieta_pruning(selectors, blocks, x, [2, 4, 6])
    assert got.shape == (4, 1 + 16 + 3, dim)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(policy, expected_policy[..., 0])
    for decision, reference in zip(decisions, expected_decisions):
        torch.testing.assert_close(decision, reference)
    # once dropped, a token stays dropped; package tokens are always kept
    assert (decisions[1] <= decisions[0]).all() and (decisions[2] <= decisions[1]).all()
    assert (policy[:, -3:] == 1).all()


def test_package_is_the_weighted_sum_of_the_newly_dropped_tokens_only():
    x = torch.arange(5 * 2, dtype=torch.float64).reshape(1, 5, 2)  # 4 patches and 1 earlier package
    prob = torch.tensor([[[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.5, 0.5]]], dtype=torch.float64)
    previous = torch.tensor([[[1.0], [0.0], [1.0], [1.0], [1.0]]], dtype=torch.float64)  # patch 1 dropped earlier
    keep = torch.tensor([[[1.0], [0.0], [0.0], [0.0], [1.0]]], dtype=torch.float64)  # drops patches 2 and 3 now
    package = package_token(x, prob, previous - keep)
    expected = 0.3 * x[0, 2] + 0.4 * x[0, 3]  # not normalised; patch 1 and the package excluded
    torch.testing.assert_close(package, expected.reshape(1, 1, 2))
    mean = package_token(x, prob, previous - keep, mean=True)
    torch.testing.assert_close(mean, ((x[0, 2] + x[0, 3]) / 2).reshape(1, 1, 2))
    assert (package_token(x, prob, torch.zeros_like(keep)) == 0).all()  # nothing dropped: a zero vector


def test_sample_keep_keeps_earlier_packages_and_earlier_drops():
    torch.manual_seed(0)
    score = torch.randn(3, 7, 2).log_softmax(-1)
    previous = torch.tensor([1.0, 0, 1, 1, 0, 1, 1]).reshape(1, 7, 1).expand(3, -1, -1)
    keep = sample_keep(score, previous, packages=2)
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert (keep[:, -2:] == 1).all() and (keep[:, [1, 4]] == 0).all()


# --- evaluation -------------------------------------------------------------------------------------


def test_keep_counts_of_the_reference_targets():
    assert keep_counts(196, [0.617, 0.369, 0.137]) == [121, 72, 27]
    with pytest.raises(ValueError):
        keep_counts(196, [0.001])


def test_top_keep_takes_the_highest_keep_margins_in_spatial_order_and_never_a_package():
    score = torch.tensor([[[0.0, 1.0], [3.0, 0.0], [1.0, 0.5], [2.0, -2.0], [9.0, 0.0]]])  # last: a package
    assert top_keep(score, 2, patches=4).tolist() == [[1, 3]]  # margins -1, 3, 0.5, 4
    assert top_keep(score, 4, patches=4).tolist() == [[0, 1, 2, 3]]


# --- losses -----------------------------------------------------------------------------------------


def reference_losses(decisions, ratios, token_pred, token_t, mask, ratio_weight=2.0):
    """``DistillDiffPruningLoss.forward``'s ratio term and token term (mse_token) as written."""
    pred_loss = 0.0
    for i, score in enumerate(decisions):
        pos_ratio = score.mean()
        pred_loss = pred_loss + ((pos_ratio - ratios[i]) ** 2).mean()
    B, N, C = token_pred.size()
    bool_mask = mask.reshape(B * N) > 0.5
    token_pred, token_t = token_pred.reshape(B * N, C), token_t.reshape(B * N, C)
    if mask.sum() < 0.1:
        token_loss = token_pred.new(1,).fill_(0.0)
    else:
        token_loss = torch.pow(token_pred[bool_mask] - token_t[bool_mask], 2).mean()
    return ratio_weight * pred_loss / len(decisions), token_loss


def test_losses_match_the_reference():
    torch.manual_seed(0)
    decisions = [(torch.rand(4, 16) > p).double() for p in (0.3, 0.6, 0.8)]
    tokens, teacher = torch.randn(4, 16, 8, dtype=torch.float64), torch.randn(4, 16, 8, dtype=torch.float64)
    expected_ratio, expected_tokens = reference_losses(decisions, [0.617, 0.369, 0.137], tokens, teacher, decisions[-1])
    torch.testing.assert_close(ratio_loss(decisions, [0.617, 0.369, 0.137], 2.0), expected_ratio)
    torch.testing.assert_close(token_distillation_loss(tokens, teacher, decisions[-1]), expected_tokens)
    nothing = torch.zeros(4, 16)
    assert token_distillation_loss(tokens, teacher, nothing) == 0


def test_ratio_loss_is_batch_level_unlike_dynamicvit():
    """One image keeps everything, the other nothing: the batch keeps half, as targeted."""
    decisions = [torch.cat([torch.ones(1, 8), torch.zeros(1, 8)])]
    assert ratio_loss(decisions, [0.5], 1.0) == 0
    assert dynamicvit_ops.ratio_loss(decisions, [0.5], 1.0) == 0.25


def test_argmax_keep_and_pack_kept_pad_to_the_largest_count():
    score = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [5.0, 0.0]],
                          [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [9.0, 0.0]]])  # last token: a package
    keep = argmax_keep(score, patches=3)
    assert keep.tolist() == [[True, False, True], [False, True, False]]
    order, valid = pack_kept(keep)
    assert order[:, :1].tolist() == [[0], [1]] and order[0].tolist() == [0, 2]  # ascending, padded
    assert valid.tolist() == [[True, True], [True, False]]
    assert argmax_keep(score, 3, valid=torch.tensor([[True, True, False], [True, True, True]]))[0].tolist() == [
        True, False, False]

"""EViT and attention ops against slow, literal transcriptions of docs/baselines.md §1.3-§1.5, §2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention

from tieta.ops.attention import class_attention, policy_attention, received_attention, softmax_with_policy
from tieta.ops.evit import evit_reduce, keep_count, keep_rate_at

# ---------------------------------------------------------------------------------------------
# helpers


def timm_qkv(batch: int = 2, tokens: int = 11, dim: int = 24, heads: int = 3, seed: int = 0):
    """q, k, v as a timm ``Attention`` with q/k LayerNorm (``qk_norm=True``) computes them.

    Returns the module, its input and q, k, v (B, H, N, d), with randomised norm parameters so
    that the qk-norm is not the identity.
    """
    torch.manual_seed(seed)
    attn = Attention(dim, num_heads=heads, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm)
    attn.eval()
    with torch.no_grad():
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.add_(torch.randn_like(norm.weight) * 0.5)
            norm.bias.add_(torch.randn_like(norm.bias) * 0.5)
    x = torch.randn(batch, tokens, dim)
    with torch.no_grad():
        qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
    return attn, x, q, k, v


def unfused_probs(q, k, scale, bias=None):
    """The full attention matrix softmax(scale q k^T + bias), in float64, (B, H, N, N)."""
    logits = (q.double() * scale) @ k.double().transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.double()
    return logits.softmax(dim=-1)


def log_size_bias(batch: int, tokens: int, seed: int = 1) -> torch.Tensor:
    """A (B, 1, 1, N) proportional-attention bias log(size), sizes 1..4."""
    generator = torch.Generator().manual_seed(seed)
    size = torch.randint(1, 5, (batch, 1, 1, tokens), generator=generator).float()
    return size.log()


def slow_softmax_with_policy(logits: torch.Tensor, policy: torch.Tensor, eps: float) -> torch.Tensor:
    """§1.5 element by element, in Python floats."""
    batch, heads, tokens, _ = logits.shape
    out = torch.empty(logits.shape, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(tokens):
                row = [logits[b, h, i, j].item() for j in range(tokens)]
                top = max(row)
                keep = [policy[b, j].item() for j in range(tokens)]
                gate = [keep[j] + (1 - keep[j]) * (1.0 if i == j else 0.0) for j in range(tokens)]
                weights = [math.exp(row[j] - top) * gate[j] for j in range(tokens)]
                total = sum(weights)
                for j in range(tokens):
                    out[b, h, i, j] = (weights[j] + eps / tokens) / (total + eps)
    return out


def slow_evit_reduce(x: torch.Tensor, scores: torch.Tensor, keep_rate: float, num_prefix: int, fuse: bool):
    """§2.2/§2.3 one image at a time: rank by score, keep the best, fuse the rest with weights a_j."""
    batch, tokens, width = x.shape
    scored = tokens - num_prefix
    kept_count = math.ceil(keep_rate * scored)
    if kept_count == scored:
        return x.clone()
    images = []
    for b in range(batch):
        ranking = sorted(range(scored), key=lambda j: scores[b, j].item(), reverse=True)
        kept = ranking[:kept_count]
        rows = [x[b, i].double() for i in range(num_prefix)]
        rows += [x[b, num_prefix + j].double() for j in kept]
        if fuse:
            fused = torch.zeros(width, dtype=torch.float64)
            for j in range(scored):
                if j not in kept:
                    fused += scores[b, j].double() * x[b, num_prefix + j].double()
            rows.append(fused)
        images.append(torch.stack(rows))
    return torch.stack(images)


# ---------------------------------------------------------------------------------------------
# class_attention / received_attention (§1.3, §1.4)


def test_unfused_reference_is_timm_attention():
    """The explicit attention matrix used below reproduces timm's fused qk-norm attention."""
    attn, x, q, k, v = timm_qkv()
    probs = unfused_probs(q, k, attn.scale)
    out = (probs @ v.double()).transpose(1, 2).reshape(x.shape)
    with torch.no_grad():
        expected = attn(x)
        got = attn.proj(out.float())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_prefix", [1, 2, 5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_class_attention_is_row_zero_of_unfused_attention(num_prefix, with_bias):
    attn, x, q, k, _ = timm_qkv(tokens=13, seed=num_prefix)
    bias = log_size_bias(x.shape[0], x.shape[1]) if with_bias else None
    expected = unfused_probs(q, k, attn.scale, bias)[:, :, 0, :].mean(dim=1)[:, num_prefix:]
    got = class_attention(q, k, attn.scale, num_prefix, bias)
    assert got.shape == (x.shape[0], x.shape[1] - num_prefix)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    assert (got.sum(dim=1) < 1).all()  # the prefix tokens hold the rest of the row


def test_class_attention_accepts_full_bias_and_half_inputs():
    attn, x, q, k, _ = timm_qkv()
    row_bias = log_size_bias(x.shape[0], x.shape[1])
    full_bias = row_bias.expand(-1, 1, x.shape[1], -1)
    expected = class_attention(q, k, attn.scale, 1, row_bias)
    torch.testing.assert_close(class_attention(q, k, attn.scale, 1, full_bias), expected)
    half = class_attention(q.bfloat16(), k.bfloat16(), attn.scale, 1, row_bias)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, expected, atol=2e-3, rtol=0.05)


def test_class_attention_needs_a_class_token():
    _, _, q, k, _ = timm_qkv()
    with pytest.raises(ValueError):
        class_attention(q, k, 0.5, 0)


@pytest.mark.parametrize("num_prefix", [0, 4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_received_attention_against_loop(num_prefix, with_bias):
    attn, x, q, k, _ = timm_qkv(tokens=9)
    batch, tokens = x.shape[:2]
    heads = q.shape[1]
    bias = log_size_bias(batch, tokens) if with_bias else None
    probs = unfused_probs(q, k, attn.scale, bias)
    expected = torch.empty(batch, tokens - num_prefix, dtype=torch.float64)
    for b in range(batch):
        for j in range(num_prefix, tokens):
            total = 0.0
            for h in range(heads):
                for i in range(tokens):
                    total += probs[b, h, i, j].item()
            expected[b, j - num_prefix] = total / (heads * tokens)
    got = received_attention(q, k, attn.scale, num_prefix, bias)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# softmax_with_policy / policy_attention (§1.5)


def random_policy(batch: int, tokens: int, seed: int = 3) -> torch.Tensor:
    """A hard keep mask with kept and dropped tokens in every image; the class token is kept."""
    generator = torch.Generator().manual_seed(seed)
    policy = (torch.rand(batch, tokens, generator=generator) > 0.5).float()
    policy[:, 0] = 1.0
    policy[:, -1] = 0.0
    return policy


@pytest.mark.parametrize("eps", [1e-6, 1e-2, 0.0])
def test_softmax_with_policy_against_transcription(eps):
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 6, 6) * 3
    policy = random_policy(2, 6)
    got = softmax_with_policy(logits, policy, eps)
    assert got.shape == logits.shape and got.dtype == logits.dtype
    expected = slow_softmax_with_policy(logits, policy, eps)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    # the (B, N, 1) policy layout of the reference code gives the same
    torch.testing.assert_close(softmax_with_policy(logits, policy.unsqueeze(-1), eps), got)


def test_softmax_with_policy_rows_and_masking():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 10, 10)
    policy = random_policy(3, 10)
    probs = softmax_with_policy(logits, policy)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(3, 4, 10), atol=1e-6, rtol=0)
    dropped = (policy == 0).view(3, 1, 1, 10).expand_as(probs)
    off_diagonal = ~torch.eye(10, dtype=torch.bool).expand_as(probs)
    assert probs[dropped & off_diagonal].max() < 1e-6  # only the eps/N share reaches others
    diagonal = probs.diagonal(dim1=-2, dim2=-1)
    assert (diagonal[dropped[:, :, 0, :]] > 1e-3).all()  # a dropped token still sees itself


def test_softmax_with_policy_all_ones_is_softmax():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 8, 8) * 2
    probs = softmax_with_policy(logits, torch.ones(2, 8))
    torch.testing.assert_close(probs, logits.softmax(dim=-1), atol=2e-6, rtol=0)


def test_softmax_with_policy_half_precision_returns_input_dtype():
    torch.manual_seed(3)
    logits = torch.randn(2, 2, 7, 7)
    policy = random_policy(2, 7)
    half = softmax_with_policy(logits.bfloat16(), policy.bfloat16())
    assert half.dtype == torch.bfloat16
    expected = softmax_with_policy(logits.bfloat16().float(), policy)
    torch.testing.assert_close(half.float(), expected, atol=4e-3, rtol=0.02)


def test_softmax_with_policy_gradient_reaches_policy():
    torch.manual_seed(4)
    logits = torch.randn(2, 2, 6, 6, requires_grad=True)
    keep_logits = torch.randn(2, 6, requires_grad=True)
    soft = keep_logits.sigmoid()
    hard = (soft > 0.5).float()
    policy = hard + soft - soft.detach()  # straight-through: hard forward, soft gradient
    probs = softmax_with_policy(logits, policy)
    (probs * torch.randn_like(probs)).sum().backward()
    assert keep_logits.grad is not None and keep_logits.grad.abs().sum() > 0
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("with_bias", [False, True])
def test_policy_attention_all_ones_matches_sdpa(with_bias):
    attn, x, q, k, v = timm_qkv(tokens=12)
    bias = log_size_bias(x.shape[0], x.shape[1]) if with_bias else None
    got = policy_attention(q, k, v, attn.scale, torch.ones(x.shape[0], x.shape[1]), bias)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert got.shape == q.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_policy_attention_is_masked_softmax_times_v():
    attn, x, q, k, v = timm_qkv(tokens=8)
    policy = random_policy(x.shape[0], x.shape[1])
    probs = slow_softmax_with_policy((q * attn.scale) @ k.transpose(-2, -1), policy, 1e-6)
    got = policy_attention(q, k, v, attn.scale, policy)
    torch.testing.assert_close(got.double(), probs @ v.double(), atol=1e-5, rtol=1e-5)


def test_policy_attention_drops_out_the_probabilities_before_v():
    """The attention's ``attn_drop`` acts on the masked softmax, as in timm's unfused attention."""
    attn, x, q, k, v = timm_qkv(tokens=8)
    policy = random_policy(x.shape[0], x.shape[1])
    probs = slow_softmax_with_policy((q * attn.scale) @ k.transpose(-2, -1), policy, 1e-6)
    got = policy_attention(q, k, v, attn.scale, policy, dropout=lambda p: p * 2)
    torch.testing.assert_close(got.double(), (probs * 2) @ v.double(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# evit_reduce (§2.2, §2.3)


def evit_inputs(batch: int, tokens: int, num_prefix: int, width: int = 16, seed: int = 0):
    """Random tokens and realistic scores: a class row (head mean) restricted to non-prefix keys."""
    torch.manual_seed(seed)
    x = torch.randn(batch, tokens, width)
    row = (torch.randn(batch, 3, tokens) * 2).softmax(dim=-1).mean(dim=1)
    return x, row[:, num_prefix:].contiguous()


@pytest.mark.parametrize("num_prefix", [1, 2, 5])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("keep_rate", [0.7, 0.5, 0.1])
def test_evit_reduce_against_transcription(num_prefix, fuse, keep_rate):
    x, scores = evit_inputs(3, 25, num_prefix)
    got = evit_reduce(x, scores, keep_rate, num_prefix, fuse=fuse)
    kept_count = math.ceil(keep_rate * (25 - num_prefix))
    assert got.shape == (3, num_prefix + kept_count + int(fuse), 16)
    expected = slow_evit_reduce(x, scores, keep_rate, num_prefix, fuse)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[:, :num_prefix], x[:, :num_prefix])  # prefix tokens in front, in order


def test_evit_reduce_order_and_unnormalised_fusion():
    num_prefix = 1
    x, scores = evit_inputs(4, 30, num_prefix, seed=5)
    x[:, :, 0] = torch.arange(30, dtype=x.dtype)  # channel 0 tells which input token a row is
    got = evit_reduce(x, scores, 0.5, num_prefix)
    kept_count = keep_count(29, 0.5)
    assert got[:, 0, 0].eq(0).all()  # class token at 0
    for b in range(4):
        kept = got[b, 1:1 + kept_count, 0].long() - num_prefix
        kept_scores = scores[b, kept]
        assert (kept_scores[:-1] > kept_scores[1:]).all()  # descending score order
        assert set(kept.tolist()) == set(scores[b].topk(kept_count).indices.tolist())
        others = [j for j in range(29) if j not in set(kept.tolist())]
        weights = scores[b, others]
        assert weights.sum() < 1  # fusion weights are not renormalised ...
        expected = (weights.unsqueeze(-1) * x[b, num_prefix + torch.tensor(others)]).sum(dim=0)
        torch.testing.assert_close(got[b, -1, 1:], expected[1:])  # ... and the fused token is last
        renormalised = expected / weights.sum()
        assert not torch.allclose(got[b, -1, 1:], renormalised[1:])


@pytest.mark.parametrize("keep_rate", [1.0, 0.96])
def test_evit_reduce_keep_all_returns_x_unchanged(keep_rate):
    x, scores = evit_inputs(2, 11, 1)  # ceil(0.96 * 10) == 10: nothing to drop, no fused token
    got = evit_reduce(x, scores, keep_rate, 1)
    assert got.shape == x.shape and torch.equal(got, x)


def test_evit_reduce_half_precision_and_gradient():
    x, scores = evit_inputs(2, 17, 1)
    scores.requires_grad_(True)
    half = evit_reduce(x.bfloat16(), scores, 0.7, 1)
    assert half.dtype == torch.bfloat16
    expected = evit_reduce(x.bfloat16().float(), scores, 0.7, 1)
    torch.testing.assert_close(half.float(), expected, atol=1e-2, rtol=1e-2)
    evit_reduce(x, scores, 0.7, 1)[:, -1].sum().backward()
    assert scores.grad.abs().sum() > 0  # the fused token carries gradient to the scores


def test_evit_reduce_rejects_bad_inputs():
    x, scores = evit_inputs(2, 11, 1)
    with pytest.raises(ValueError):
        evit_reduce(x, scores[:, 1:], 0.7, 1)
    with pytest.raises(ValueError):
        evit_reduce(x, scores, 0.0, 1)


# ---------------------------------------------------------------------------------------------
# token counts (§2.6)


def test_keep_count_uses_float_arithmetic():
    assert keep_count(196, 0.7) == 138
    assert keep_count(100, 0.55) == 56  # 0.55 * 100 == 55.00000000000001
    assert keep_count(10, 0.96) == 10


TABLE = [  # keep rate, fusion, tokens entering the MLP of blocks 3-5, 6-8, 9-11 (§2.6)
    (0.5, True, [100, 52, 28]),
    (0.6, True, [120, 74, 46]),
    (0.7, True, [140, 100, 72]),
    (0.7, False, [139, 98, 69]),
    (0.8, True, [159, 129, 105]),
    (0.9, True, [179, 163, 148]),
]


@pytest.mark.parametrize("keep_rate, fuse, expected", TABLE)
def test_token_counts_of_three_reductions(keep_rate, fuse, expected):
    tokens, counts = 197, []
    for _ in range(3):
        tokens = 1 + keep_count(tokens - 1, keep_rate) + int(fuse)
        counts.append(tokens)
    assert counts == expected

    x = torch.randn(2, 197, 8)
    counts = []
    for _ in range(3):
        scores = torch.rand(2, x.shape[1] - 1) / x.shape[1]
        x = evit_reduce(x, scores, keep_rate, 1, fuse=fuse)
        counts.append(x.shape[1])
    assert counts == expected


# ---------------------------------------------------------------------------------------------
# keep-rate warm-up (§2.4, §2.8 item 7)


def test_keep_rate_at_schedule_points():
    base, start, length = 0.7, 10, 100
    for epoch in (0, 5, 9, 9.99):
        assert keep_rate_at(epoch, base, start, length) == 1.0  # before the start
    assert keep_rate_at(start, base, start, length) == pytest.approx(1.0)  # t = 0
    assert keep_rate_at(start + length / 2, base, start, length) == pytest.approx((1 + base) / 2)  # t = T/2
    assert base < keep_rate_at(start + length - 0.01, base, start, length) < base + 1e-4
    for epoch in (start + length, start + length + 1, 1000):
        assert keep_rate_at(epoch, base, start, length) == base  # from s0 + S on


def test_keep_rate_at_without_warmup_is_constant():
    assert keep_rate_at(0, 0.7) == 0.7
    assert keep_rate_at(29, 0.7) == 0.7
    assert keep_rate_at(4, 0.7, start_epoch=5) == 1.0
    assert keep_rate_at(5, 0.7, start_epoch=5) == 0.7


def test_keep_rate_at_fractional_epochs_reproduce_the_per_iteration_schedule():
    base, start, length, iters_per_epoch = 0.5, 2, 3, 7
    for it in range(0, iters_per_epoch * 7):
        epoch = it // iters_per_epoch
        # §2.4: t counted in iterations, T = I * S, the branches decided by the integer epoch
        if epoch < start:
            expected = 1
        elif epoch >= start + length:
            expected = base
        else:
            t, total = it - iters_per_epoch * start, iters_per_epoch * length
            expected = base + (1 - base) * (math.cos(math.pi * t / total) + 1) / 2
        got = keep_rate_at(it / iters_per_epoch, base, start, length)
        assert got == pytest.approx(expected, abs=1e-12)

"""SPViT: a multi-head token selector and a package token (Kong et al., ECCV 2022).

Before a few blocks (the stages, blocks 3, 6 and 9 of a 12-block ViT) a small selector scores the
patch tokens, head by head: each head's slice of the token goes through one small MLP that sees the
token (local half) and the mean of the kept tokens (global half), and an SE-style gate weighs the
heads per token. The tokens the stage drops are not discarded but folded into one package token,
their sum weighted by the selector's keep probability, appended at the end; a package token is an
ordinary token afterwards, never dropped. In training the decisions are hard Gumbel samples with a
straight-through gradient and act as attention masks; at evaluation the chosen tokens are gathered.

    selector = MultiheadPredictorLG(dim, heads)                  # (B, n, D), (B, n, 1) -> 2 x (B, n, 2)
    counts = keep_counts(patches, ratios)                        # patch tokens kept per stage at evaluation
    keep = sample_keep(score, previous, packages)                # training: (B, n, 1) in {0, 1}
    indices = top_keep(score, k, patches)                        # evaluation: (B, k), spatial order
    package = package_token(x, prob, drop)                       # (B, 1, D) folded dropped tokens
    loss = ratio_loss(decisions, ratios, weight)                 # batch-level keep-rate target

What follows the reference code (``PeiyanFlying/SPViT``, ``vit_l2_3keep_senet.py``) as written:

- the selector's heads share one ``in_conv`` and one ``out_conv`` (the reference builds its
  per-head lists from one module object), so it has 7,092 parameters at D = 768, H = 12;
- channel 0 is keep; the Gumbel sample is drawn from the head-weighted mean of the heads'
  log-softmaxes, the package weights are the head-weighted mean of their softmaxes;
- the package token is the un-normalised weighted sum of the tokens dropped at this stage only
  (tokens dropped earlier and earlier packages have weight 0), and it is appended even when
  nothing was dropped (then it is a zero vector that still takes part in attention);
- the ratio loss compares the batch-level kept share with each stage's target (not per image,
  as DynamicViT does).

Where this differs from the reference (labelled):

- evaluation keeps, per stage, the ``round(P * r_s)`` patch tokens the selector rates highest, in
  spatial order (the reference samples Gumbel noise at evaluation too, so its predictions are
  random, and keeps a different count per image); a fixed count keeps batches rectangular and the
  cost known;
- ``package_token(..., mean=True)`` is the inference file's plain mean of the dropped tokens;
- the reference's NaN guard on the package (``nan_to_num``) is left out: the sum is finite for
  finite tokens.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Floor of a policy sum in the global mean and of a package's token count: both are 0 or >= 1 for
# hard decisions, so the floor only turns 0 / 0 into 0.
_SUM_FLOOR = 1e-6


class MultiheadPredictorLG(nn.Module):
    """SPViT's selector for one stage: per-head keep / drop scores and an SE gate over the heads.

    Each token x (D) is cut into H head slices of width d = D / H. One MLP (shared by the heads,
    as in the reference) scores each slice from its local half and the policy-masked mean of its
    global half over the tokens; the gate ``senet`` weighs the heads by the tokens' per-head means.
    The submodule names (``senet``, ``in_conv``, ``out_conv``) are the reference's.

    Args:
        dim: token width D.
        heads: H; D must be divisible by H. The module has
            ``2 * H * (H // 2) + H // 2 + H + 1.625 * d**2 + 4.25 * d + 2`` parameters
            (7,092 at D = 768, H = 12; 6,975 at D = 384, H = 6).
        tied: one MLP for all heads (the reference code's modules); False: one per head, what
            "multi-head selector" suggests (83,322 parameters at D = 768, H = 12), run head by head
            (a loop over the H heads, not over images).
    """

    def __init__(self, dim: int, heads: int, tied: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"the width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.tied = dim, heads, tied
        head_dim = dim // heads
        self.senet = nn.Sequential(nn.Linear(heads, heads // 2), nn.GELU(), nn.Linear(heads // 2, heads), nn.Sigmoid())

        def in_conv() -> nn.Module:
            return nn.Sequential(nn.LayerNorm(head_dim), nn.Linear(head_dim, head_dim), nn.GELU())

        def out_conv() -> nn.Module:
            return nn.Sequential(nn.Linear(head_dim, head_dim // 2), nn.GELU(), nn.Linear(head_dim // 2, head_dim // 4),
                                 nn.GELU(), nn.Linear(head_dim // 4, 2))

        if tied:
            self.in_conv, self.out_conv = in_conv(), out_conv()
        else:
            self.in_conv = nn.ModuleList(in_conv() for _ in range(heads))
            self.out_conv = nn.ModuleList(out_conv() for _ in range(heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference model's init: trunc-normal(0.02) weights, zero biases, LayerNorm at (1, 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score the tokens of one stage.

        Args:
            x: (B, n, D) the non-prefix tokens entering the stage's block (patches, then the
                earlier stages' package tokens).
            policy: (B, n, 1) the previous decisions (ones before the first stage, and for
                packages); the global half is the mean over the tokens it keeps.

        Returns:
            score: (B, n, 2) the head-weighted mean of the heads' log-softmaxes (the Gumbel logits);
            prob: (B, n, 2) the head-weighted mean of the heads' softmaxes (the package weights).
            Channel 0 is keep.
        """
        batch, tokens, _ = x.shape
        slices = x.reshape(batch, tokens, self.heads, -1)  # (B, n, H, d)
        weights = self.senet(slices.mean(dim=-1)).unsqueeze(-1)  # (B, n, H, 1), AdaptiveAvgPool2d((n, H))
        z = self._per_head(self.in_conv, slices)
        half = z.shape[-1] // 2
        policy = policy.to(z.dtype).unsqueeze(-1)  # (B, n, 1, 1)
        kept = (z[..., half:] * policy).sum(dim=1, keepdim=True)  # (B, 1, H, d - d/2)
        global_ = kept / policy.sum(dim=1, keepdim=True).clamp_min(_SUM_FLOOR)
        logits = self._per_head(self.out_conv, torch.cat([z[..., :half], global_.expand_as(z[..., half:])], dim=-1))
        total = weights.sum(dim=2)  # (B, n, 1)
        score = (F.log_softmax(logits, dim=-1) * weights).sum(dim=2) / total
        prob = (F.softmax(logits, dim=-1) * weights).sum(dim=2) / total
        return score, prob

    def _per_head(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, n, H, d_in) -> (B, n, H, d_out): the shared MLP on every slice, or head h's on slice h."""
        if self.tied:
            return conv(x)
        return torch.stack([head(x[:, :, index]) for index, head in enumerate(conv)], dim=2)


def keep_counts(patches: int, ratios: Sequence[float]) -> list[int]:
    """Patch tokens kept at each stage at evaluation: ``round(patches * r)`` (Python's round).

    The ratios are fractions of the original patch count, cumulative over the stages, as the
    reference's ratio targets are: ``keep_counts(196, [0.617, 0.369, 0.137]) == [121, 72, 27]``.

    Raises:
        ValueError: a ratio outside (0, 1], or one that keeps no token.
    """
    counts = []
    for ratio in ratios:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"keep ratio {ratio} is outside (0, 1]")
        count = round(patches * ratio)
        if count < 1:
            raise ValueError(f"keep ratio {ratio} keeps no token of {patches}")
        counts.append(count)
    return counts


def sample_keep(score: torch.Tensor, previous: torch.Tensor, packages: int) -> torch.Tensor:
    """Training decision: a hard Gumbel-softmax sample of keep (temperature 1, straight-through),
    and-ed with the previous decision; the last ``packages`` tokens (earlier packages) are kept.

    Args:
        score: (B, n, 2) the selector's Gumbel logits, channel 0 = keep.
        previous: (B, n, 1) the previous decisions (ones before the first stage).
        packages: how many of the n tokens, at the end, are earlier stages' package tokens.

    Returns:
        (B, n, 1) keep decisions in {0, 1}.
    """
    keep = F.gumbel_softmax(score, tau=1.0, hard=True)[..., 0:1] * previous
    if packages == 0:
        return keep
    return torch.cat([keep[:, :-packages], keep.new_ones(keep.shape[0], packages, 1)], dim=1)


def top_keep(score: torch.Tensor, k: int, patches: int) -> torch.Tensor:
    """Evaluation decision: the k of the first ``patches`` tokens most likely kept, in spatial order.

    Tokens are ranked by ``score[..., 0] - score[..., 1]``, the logit of keep in the Gumbel sample
    (a token is kept more often than dropped exactly where it is positive).

    Args:
        score: (B, n, 2) the selector's Gumbel logits; the tokens after ``patches`` (packages) are
            not candidates.
        k: tokens to keep, at most ``patches``.
        patches: the candidates, the first ``patches`` of the n tokens.

    Returns:
        (B, k) indices in ascending order (the order the tokens stand in).
    """
    margin = score[:, :patches, 0] - score[:, :patches, 1]
    return margin.topk(k, dim=1, largest=True, sorted=False).indices.sort(dim=1).values


def package_token(x: torch.Tensor, prob: torch.Tensor, drop: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """The package token: the tokens dropped at this stage, folded into one.

    ``sum_j prob_j * drop_j * x_j`` (the training file's form, not normalised), or with ``mean``
    ``sum_j drop_j * x_j / sum_j drop_j`` (the inference file's, per image; 0 when none dropped).

    Args:
        x: (B, n, D) the tokens the selector scored.
        prob: (B, n, 1) or (B, n, 2) keep probabilities (channel 0 is used).
        drop: (B, n, 1) 1 for the tokens dropped at this stage, 0 elsewhere (earlier drops, packages).
        mean: the inference file's plain mean instead.

    Returns:
        (B, 1, D).
    """
    drop = drop.to(x.dtype)
    if mean:
        return (x * drop).sum(dim=1, keepdim=True) / drop.sum(dim=1, keepdim=True).clamp_min(_SUM_FLOOR)
    return (x * (prob[..., 0:1].to(x.dtype) * drop)).sum(dim=1, keepdim=True)


def ratio_loss(decisions: Sequence[torch.Tensor], ratios: Sequence[float], weight: float = 2.0,
               batch_mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean) -> torch.Tensor:
    """Pull the batch's kept share towards each stage's target.

    ``(weight / S) * sum_s (mean_{b,i} p_s[b, i] - r_s) ** 2``: the share is taken over the whole
    batch (``losses_l2.py``), so one image may keep more where another keeps less.

    Args:
        decisions: S tensors (B, P), the training decisions over the original patch tokens.
        ratios: the S targets, fractions of P.
        weight: the loss weight (the reference's ``--ratiow``, 2.0).
        batch_mean: (B,) -> scalar, the mean over the batch (data-parallel training: the global one).

    Returns:
        Scalar loss.

    Raises:
        ValueError: no stages, or a different number of decisions and ratios.
    """
    if len(decisions) == 0 or len(decisions) != len(ratios):
        raise ValueError(f"need one ratio per stage, got {len(decisions)} decisions and {len(ratios)} ratios")
    shares = [batch_mean(decision.flatten(1).mean(dim=1)) for decision in decisions]  # kept share per stage
    total = sum((share - ratio) ** 2 for share, ratio in zip(shares, ratios))
    return total * (weight / len(decisions))


def token_distillation_loss(tokens: torch.Tensor, teacher_tokens: torch.Tensor, keep: torch.Tensor,
                            batch_mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean) -> torch.Tensor:
    """Mean squared error between student and teacher patch tokens over the kept tokens
    (``losses_l2.py`` with ``mse_token``): the mean over the #kept * D entries, 0 when none is kept.

    Written as a ratio of two batch means (squared error per image over entries per image), which
    is the same quotient and stays exact when ``batch_mean`` is data-parallel's global mean.

    Args:
        tokens: (B, P, D) the student's final-norm patch tokens (package tokens excluded).
        teacher_tokens: (B, P, D) the teacher's, detached by the caller.
        keep: (B, P) or (B, P, 1) the last stage's decisions; a token counts where it is > 0.5.
        batch_mean: (B,) -> scalar, the mean over the batch.

    Returns:
        Scalar loss.
    """
    kept = (keep.reshape(tokens.shape[:2]) > 0.5).unsqueeze(-1)  # (B, P, 1), no gradient
    squared = torch.where(kept, (tokens - teacher_tokens) ** 2, tokens.new_zeros(()))
    entries = kept.flatten(1).sum(dim=1).to(tokens.dtype) * tokens.shape[-1]  # (B,)
    # the floor gives 0 when nothing is kept, without a host sync to test for it
    return batch_mean(squared.flatten(1).sum(dim=1)) / batch_mean(entries).clamp_min(_SUM_FLOOR)


def argmax_keep(score: torch.Tensor, patches: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Evaluation decision per image: keep a patch token where its keep logit beats its drop logit
    (the most likely Gumbel sample), so each image keeps its own number of tokens.

    Args:
        score: (B, n, 2) the selector's Gumbel logits; the first ``patches`` tokens are candidates.
        patches: the candidates.
        valid: (B, patches) bool, False for padding (never kept); None: all valid.

    Returns:
        (B, patches) bool.
    """
    keep = score[:, :patches, 0] > score[:, :patches, 1]
    return keep if valid is None else keep & valid


def pack_kept(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens of each image first, in ascending order, padded to the batch's largest count.

    Args:
        keep: (B, P) bool.

    Returns:
        order: (B, m) indices, m the largest count in the batch (read from the data: a host sync);
            an image's entries past its count are indices of tokens it did not keep (padding).
        valid: (B, m) bool, False for the padding.
    """
    counts = keep.sum(dim=1)
    largest = int(counts.max()) if keep.numel() else 0
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :largest]
    valid = torch.arange(largest, device=keep.device) < counts[:, None]
    return order, valid

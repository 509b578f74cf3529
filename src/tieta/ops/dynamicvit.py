"""DynamicViT: learned token pruning with a per-stage prediction module (Rao et al., NeurIPS 2021).

Before a few blocks (the stages, e.g. blocks 3, 6 and 9 of a 12-block ViT) a small MLP, the
prediction module, scores every patch token. In training the keep decisions are sampled with a
hard Gumbel-softmax (straight-through gradient) and applied as attention masks, so all tokens stay
in the tensor; at evaluation the top-scoring tokens are physically gathered and the rest discarded.
A ratio loss pulls the fraction kept towards the target of each stage; an optional distillation
term compares the pruned model's class prediction with the unpruned one's.

This module holds the pure parts, testable on random tensors:

    predictor = PredictorLG(dim)                          # (B, P, D), (B, P, 1) -> (B, P, 2) log-probs
    counts = keep_counts(patches, ratios)                 # tokens kept at each stage at evaluation
    decision = sample_keep(log_probs, previous)           # training: (B, P, 1) in {0, 1}
    indices = top_keep(log_probs, k)                      # evaluation: (B, k), best first
    x = gather_tokens(x, indices, num_prefix)             # prefix tokens first, then the chosen ones
    loss = ratio_loss(decisions, ratios, weight)          # keep-fraction target, per sample
    loss = distillation_loss(logits, teacher_logits)      # KL on the class logits

Where the reference code (``raoyongming/DynamicViT``) and the paper differ, the code is followed:

- Channel 0 of the predictor output is the *keep* log-probability (the paper's text calls
  channel 0 the drop probability).
- The ratio loss is divided by the number of stages S (the paper sums over the stages).
- Keep ratios are fractions of the *original* patch count P, cumulative over the stages
  (``[0.7, 0.49, 0.343]`` keeps 137, 96 and 67 of 196 patches), not of the tokens left by the
  previous stage.

Prefix tokens (class, distillation, registers) are never scored: every function here works on the
P patch tokens, and ``gather_tokens`` keeps the prefix in front.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Floor of the policy sum in the global mean: hard decisions sum to 0 or to at least ~1, so this
# only changes the case where an image has lost every token (0 instead of NaN).
_POLICY_SUM_FLOOR = 1e-6


class PredictorLG(nn.Module):
    """The prediction module of one stage: local and global features -> keep / drop log-probs.

    Each token's feature is split in two halves: the first half stays per token (local), the
    second half is averaged over the tokens still kept (global), so a token is judged both on
    its own and against the image as a whole.

    The submodule names (``in_conv``, ``out_conv``) match the reference code, so that its
    checkpoints' predictor weights load as they are.

    Args:
        dim: token width D. The module has ``1.625 * D**2 + 4.25 * D + 2`` parameters.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Trunc-normal(0.02) weights and zero biases for the linear layers; LayerNorm at (1, 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """Score the patch tokens.

        Args:
            x: (B, P, D) patch tokens entering the stage's block (no prefix tokens).
            policy: (B, P, 1) the previous stage's keep decisions (ones before the first stage);
                the global half is the mean over the tokens it keeps.

        Returns:
            (B, P, 2) log-probabilities; channel 0 is keep, channel 1 is drop.
        """
        z = self.in_conv(x)
        half = z.shape[-1] // 2
        policy = policy.to(z.dtype)
        local = z[..., :half]
        kept_sum = (z[..., half:] * policy).sum(dim=1, keepdim=True)  # (B, 1, D - D/2)
        global_ = kept_sum / policy.sum(dim=1, keepdim=True).clamp_min(_POLICY_SUM_FLOOR)
        return self.out_conv(torch.cat([local, global_.expand_as(z[..., half:])], dim=-1))


def keep_counts(patches: int, ratios: Sequence[float]) -> list[int]:
    """Patch tokens kept at each stage at evaluation.

    Plain Python float arithmetic, truncated, as the reference does it: the ratios are fractions of
    the original patch count, so ``keep_counts(196, [0.9, 0.9 - 0.2, 0.9 - 0.4]) == [176, 137, 98]``.

    Args:
        patches: the original number of patch tokens P (196 for 224 px at patch 16).
        ratios: keep ratio of each stage, each in (0, 1].

    Returns:
        ``[int(patches * r) for r in ratios]``.

    Raises:
        ValueError: a ratio outside (0, 1], or one that keeps no token.
    """
    counts = []
    for ratio in ratios:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"keep ratio {ratio} is outside (0, 1]")
        count = int(patches * ratio)
        if count < 1:
            raise ValueError(f"keep ratio {ratio} keeps no token of {patches}")
        counts.append(count)
    return counts


def sample_keep(log_probs: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Training decision: a hard Gumbel-softmax sample of keep, and-ed with the previous decision.

    The forward value is exactly 0 or 1; the backward pass is the straight-through gradient of the
    soft sample (temperature 1, as the reference). Multiplying by ``previous`` keeps a token
    dropped at an earlier stage dropped.

    Args:
        log_probs: (B, P, 2) predictor output, channel 0 = keep.
        previous: (B, P, 1) the previous stage's decisions (ones before the first stage).

    Returns:
        (B, P, 1) keep decisions.
    """
    return F.gumbel_softmax(log_probs, tau=1.0, hard=True)[..., 0:1] * previous


def top_keep(log_probs: torch.Tensor, k: int) -> torch.Tensor:
    """Evaluation decision: the k patch tokens with the highest keep score.

    Args:
        log_probs: (B, P, 2) predictor output, channel 0 = keep.
        k: tokens to keep, at most P.

    Returns:
        (B, k) patch-token indices (0 = first patch token after the prefix), highest score first;
        this order is also the order of the tokens after ``gather_tokens``, as in the reference.
    """
    return log_probs[..., 0].topk(k, dim=1, largest=True, sorted=True).indices


def gather_tokens(x: torch.Tensor, indices: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """The prefix tokens followed by the chosen patch tokens.

    With ``num_prefix=0`` it selects rows of any per-patch tensor, e.g. the (B, P, 1) decisions.

    Args:
        x: (B, num_prefix + P, D) tokens.
        indices: (B, k) indices into the patch tokens, i.e. into ``x[:, num_prefix:]``.
        num_prefix: leading tokens (class, distillation, registers) always kept, in front.

    Returns:
        (B, num_prefix + k, D).
    """
    patches = x[:, num_prefix:]
    index = indices.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return torch.cat([x[:, :num_prefix], patches.gather(1, index)], dim=1)


def ratio_loss(decisions: Sequence[torch.Tensor], ratios: Sequence[float], weight: float = 2.0,
               batch_mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean) -> torch.Tensor:
    """Pull each image's kept fraction towards its stage's target.

    ``(weight / S) * sum_s mean_b (r_s - mean_i p_s[b, i]) ** 2``: the fraction is taken per image
    (the reference's non-dynamic form), so a batch cannot meet the target by keeping everything in
    one image and nothing in another.

    Args:
        decisions: S tensors (B, P) (or (B, P, 1)), the training decisions of each stage.
        ratios: the S target keep ratios, fractions of the original P.
        weight: the loss weight (``--ratio_weight``; 2.0 by default, 5.0 in the DeiT-B command).
        batch_mean: (B,) -> scalar, the mean over the batch (data-parallel training: over the global one).

    Returns:
        Scalar loss.

    Raises:
        ValueError: no stages, or a different number of decisions and ratios.
    """
    if len(decisions) == 0 or len(decisions) != len(ratios):
        raise ValueError(f"need one ratio per stage, got {len(decisions)} decisions and {len(ratios)} ratios")
    total = sum(batch_mean((ratio - decision.flatten(1).mean(dim=1)) ** 2) for decision, ratio in zip(decisions, ratios))
    return total * (weight / len(decisions))


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor,
                      batch_mean: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """KL(teacher || student) of the class distributions, summed over classes, batch mean.

    Args:
        logits: (B, C) student logits.
        teacher_logits: (B, C) teacher logits, detached by the caller.
        batch_mean: (B,) -> scalar; None: torch's "batchmean" (data-parallel training gives its own).

    Returns:
        Scalar loss (temperature 1).
    """
    student, teacher = F.log_softmax(logits, dim=-1), F.log_softmax(teacher_logits, dim=-1)
    if batch_mean is None:
        return F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return batch_mean(F.kl_div(student, teacher, reduction="none", log_target=True).sum(dim=-1))

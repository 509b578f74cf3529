"""LoRA on the fused qkv projection of every attention layer.

Two flavours share one module:

* ``targets="qkv"`` (the default, as NOAH and PYRA use it): one low-rank pair on the whole fused
  projection, ``qkv(x) + B(A(dropout(x)))`` with A: D -> rank and B: rank -> 3D, and scale 1.
* any subset of q, k, v given separately (``"qv"``, ``"q"``, ``("q", "k", "v")``...): one pair per
  projection, as LoRA on separate query/value layers, usually with ``alpha`` so that the update is
  scaled by ``alpha / rank``.

timm's Eva models: a fused ``qkv`` (EVA-02, the rope ViTs) takes LoRA as above, its separate
``q_bias``/``v_bias`` still added; separate ``q_proj``/``k_proj``/``v_proj`` layers (no fused layer)
get one pair each for the letters given, and ``"qkv"`` means all three (three pairs, not one).

Initialisation: A kaiming-uniform (a = sqrt 5), B zeros, so a fresh LoRA is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from tieta.errors import TietaError
from tieta.methods.blocks import patch_blocks
from tieta.methods.method import MAX_WIDTH, Method, bounded

Targets = Union[str, Sequence[str]]
_SLOTS = {"q": 0, "k": 1, "v": 2}


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` plus a low-rank update on some row blocks of its output.

    Made from an existing ``nn.Linear`` by :func:`attach_lora`, so ``weight`` and ``bias`` stay the
    very same parameters (and state-dict keys) as before; LoRA adds ``lora_A`` and ``lora_B``.

    Attributes:
        lora_A: (T * rank, in_features) down projections of the T targets, stacked.
        lora_B: (T, rows, rank) up projections; target t writes output rows
            ``lora_row_starts[t] : lora_row_starts[t] + rows``.
        lora_scale: the update's multiplier (1, or alpha / rank).
    """

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def lora_up_matrix(self) -> torch.Tensor:
        """All targets' B matrices placed in one (out_features, T * rank) matrix, zero elsewhere."""
        num_targets, rows, rank = self.lora_B.shape
        if num_targets == 1 and rows == self.out_features:
            return self.lora_B[0]
        up = self.lora_B.new_zeros(self.out_features, num_targets * rank)
        for t, start in enumerate(self.lora_row_starts):
            up[start:start + rows, t * rank:(t + 1) * rank] = self.lora_B[t]
        return up

    def lora_delta_weight(self) -> torch.Tensor:
        """The (out_features, in_features) matrix that LoRA adds to ``weight``."""
        return (self.lora_up_matrix() @ self.lora_A) * self.lora_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (..., in_features). Returns: (..., out_features)."""
        down = F.linear(self.lora_dropout(x), self.lora_A)
        return F.linear(x, self.weight, self.bias) + F.linear(down, self.lora_up_matrix()) * self.lora_scale

    def output_rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Output features ``start:stop`` of :meth:`forward` alone, their rows of the weight and of the
        update (a caller that needs only q and k, or only v, of a fused qkv skips the rest).

        Args: x: (..., in_features). Returns: (..., stop - start).
        """
        down = F.linear(self.lora_dropout(x), self.lora_A)
        bias = None if self.bias is None else self.bias[start:stop]
        return (F.linear(x, self.weight[start:stop], bias)
                + F.linear(down, self.lora_up_matrix()[start:stop]) * self.lora_scale)

    def extra_repr(self) -> str:
        num_targets, _, rank = self.lora_B.shape
        return f"{super().extra_repr()}, lora_rank={rank}, lora_targets={num_targets}, lora_scale={self.lora_scale:g}"


def parse_targets(targets: Targets) -> Optional[tuple[int, ...]]:
    """Return None for the fused "qkv" pair, else the sorted q/k/v slots (0, 1, 2) to adapt."""
    if isinstance(targets, str):
        if targets == "qkv":
            return None
        letters = list(targets)
    else:
        letters = list(targets)
    if not letters or any(letter not in _SLOTS for letter in letters) or len(set(letters)) != len(letters):
        raise TietaError(
            f"LoRA targets must be 'qkv' (one fused pair) or distinct letters from q, k, v such as 'qv'; got {targets!r}"
        )
    return tuple(sorted(_SLOTS[letter] for letter in letters))


def attach_lora(
    linear: nn.Linear,
    rank: int,
    slots: Optional[Iterable[int]] = None,
    alpha: Optional[float] = None,
    dropout: float = 0.0,
) -> LoRALinear:
    """Turn ``linear`` (a fused qkv projection when ``slots`` is given) into a LoRALinear in place.

    Args:
        linear: the layer; its out_features must split in three equal parts when slots are given.
        rank: the LoRA rank.
        slots: None for one pair over all outputs, else which thirds (0 q, 1 k, 2 v) get their own pair.
        alpha: None for scale 1 (the NOAH/PYRA code), else the update is scaled by alpha / rank.
        dropout: dropout on the LoRA input.
    """
    if type(linear) is not nn.Linear:
        raise TietaError(f"LoRA attaches to a plain nn.Linear, found {type(linear).__name__} (LoRA already added?)")
    LoRAConfig(rank=rank, alpha=alpha, dropout=dropout).check(prefix="LoRA ")
    if slots is None:
        row_starts, rows = (0,), linear.out_features
    else:
        rows = linear.out_features // 3
        row_starts = tuple(slot * rows for slot in slots)
    weight = linear.weight
    factory = dict(device=weight.device, dtype=weight.dtype)
    lora_a = torch.empty(len(row_starts) * rank, linear.in_features, **factory)
    for t in range(len(row_starts)):
        nn.init.kaiming_uniform_(lora_a[t * rank:(t + 1) * rank], a=math.sqrt(5))
    linear.__class__ = LoRALinear
    linear.lora_A = nn.Parameter(lora_a)
    linear.lora_B = nn.Parameter(torch.zeros(len(row_starts), rows, rank, **factory))
    linear.lora_row_starts = row_starts
    linear.lora_scale = 1.0 if alpha is None else float(alpha) / rank
    linear.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    return linear


def add_lora(
    model: nn.Module,
    rank: int = 8,
    targets: Targets = "qkv",
    alpha: Optional[float] = None,
    dropout: float = 0.1,
) -> nn.Module:
    """Add LoRA to the qkv projection of every block of a timm ViT, in place.

    Args:
        model: a timm VisionTransformer.
        rank: LoRA rank (the papers: 8 for ViT-B, 12 for ViT-L, 4 for ViT-S).
        targets: "qkv" for one fused pair (NOAH/PYRA), or letters from q, k, v for one pair each.
        alpha: None for scale 1 (reference code), else scale alpha / rank.
        dropout: dropout on the LoRA input (0.1 in the reference code).

    Returns:
        The same model.
    """
    LoRAConfig(rank=rank, targets=targets, alpha=alpha, dropout=dropout).check(prefix="LoRA ")
    slots = parse_targets(targets)
    for block in patch_blocks(model):
        attn = block.attn
        if getattr(attn, "qkv", None) is None:  # an Eva attention with separate q_proj, k_proj, v_proj
            names = ("q_proj", "k_proj", "v_proj")
            for slot in (0, 1, 2) if slots is None else slots:
                attach_lora(getattr(attn, names[slot]), rank, None, alpha, dropout)
            continue
        attach_lora(attn.qkv, rank, slots, alpha, dropout)
        if getattr(attn, "q_bias", None) is not None:
            # timm's EvaAttention applies its q/v biases with the qkv weight in one F.linear, which
            # would skip the LoRA layer; "separate" adds them after calling the layer (same sum)
            attn.qkv_bias_separate = True
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight and make the layer a plain ``nn.Linear`` again, in place.

    The merged model computes the same function (to float rounding) with no extra cost. Raises a
    TietaError if a merged weight would hold NaN or inf, leaving that layer unmerged.
    """
    for module in model.modules():
        if isinstance(module, LoRALinear):
            with torch.no_grad():
                merged = module.weight + module.lora_delta_weight().to(module.weight.dtype)
                if not torch.isfinite(merged).all():
                    raise TietaError("merging LoRA would put NaN or inf into the weights; the model was left unmerged")
                module.weight.copy_(merged)
            del module.lora_A, module.lora_B, module.lora_dropout
            del module.lora_row_starts, module.lora_scale
            module.__class__ = nn.Linear
    return model


@dataclass
class LoRAConfig:
    rank: int = bounded(8, at_most=MAX_WIDTH)
    targets: str = "qkv"  # "qkv": one fused pair (NOAH/PYRA); or letters of q, k, v: one pair each
    alpha: Optional[float] = None  # None: scale 1 (reference code); else alpha / rank
    dropout: float = 0.1

    def check(self, prefix: str = "lora.") -> None:
        """Raise a TietaError, in one sentence, for settings that cannot work. ``prefix`` names the
        fields as the user wrote them: the config section's, "LoRA " for add_lora's arguments."""
        if self.rank < 1:
            raise TietaError(f"{prefix}rank must be a positive integer, got {self.rank}")
        parse_targets(self.targets)
        if not 0 <= self.dropout < 1:
            raise TietaError(f"{prefix}dropout must be in [0, 1), got {self.dropout}")
        if self.alpha is not None and not self.alpha > 0:
            raise TietaError(f"{prefix}alpha must be positive (or null for scale 1), got {self.alpha}")


def _validate(config) -> None:
    config.lora.check()


METHOD = Method(
    name="lora",
    sections={"lora": LoRAConfig},
    attach=lambda model, config: add_lora(model, config.lora.rank, config.lora.targets, config.lora.alpha,
                                          config.lora.dropout),
    modules=("lora_A", "lora_B"),
    validate=_validate,
)

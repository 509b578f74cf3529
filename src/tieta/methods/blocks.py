"""The one place that changes how a timm ViT runs.

tieta never copies timm's attention or MLP code: a block keeps its own ``norm1``, ``attn``, ``ls1``,
``drop_path1``, ``norm2``, ``mlp``, ``ls2`` and ``drop_path2`` modules, and only the order in which
the block calls them is restated here, with room for tieta's additions:

    x = x + attn(norm1(x), attn_mask = log(size) if proportional attention)
    x, size = merge(x, size)                # ToMe / PYRA, when the block merges (r > 0)
    x = x + m * mlp(norm2(x)) + adapter(x)  # m: DyT's dispatch (1 without DyT); adapter: AdaptFormer

(DyT's other variants gate attention, or both, with the same kind of mask.)

With every addition switched off, a patched model computes exactly what timm computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from timm.models.vision_transformer import Block, VisionTransformer

from tieta.errors import TietaError
from tieta.methods.dyt import attend_on_active, dispatch_mask, key_mask, run_on_active, with_prefix
from tieta.methods.tome import bipartite_soft_matching, max_merges, merge_source, merge_wavg
from tieta.native.tome_merge import native_merge, native_merge_applies


@dataclass
class TokenState:
    """What the blocks of one forward pass share about the current tokens.

    Attributes:
        size: (B, N, 1) input patches per token, None until the first merge.
        attn_bias: (B, 1, 1, N) log(size), the proportional-attention mask for the next block.
        source: (B, N, N0) input tokens held by each token, when ``trace_source`` is on.
        prop_attn: add log(size) to the attention logits (proportional attention).
        trace_source: keep ``source`` (for visualising merges; costs memory).
    """

    prop_attn: bool = True
    trace_source: bool = False
    size: Optional[torch.Tensor] = None
    attn_bias: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.size, self.attn_bias, self.source = None, None, None


class TietaBlock(Block):
    """timm's pre-norm ``Block`` with optional token merging, token dispatch and an adapter.

    Attributes (set by the methods; None / 0 means "off"):
        adapter: AdaptFormer module, fed the stream after the attention residual (and merge); not
            under LayerScale or drop-path (as in the reference code).
        merge_r: tokens this block merges away (ToMe); 0 for none.
        pyra: PYRA's re-activation of the merged tokens.
        token_state: the model's shared TokenState, when token merging is attached.
        dispatcher, mlp_dispatcher: DyT's token dispatchers (nn.Linear(D, 1)); which module each
            one gates depends on ``dyt_variant`` ("mlp", "attn", "attn_mlp", "layer").
        dispatch_state: the model's shared DispatchState, when DyT is attached.
    """

    adapter: Optional[nn.Module]
    pyra: Optional[nn.Module]
    dispatcher: Optional[nn.Module]
    mlp_dispatcher: Optional[nn.Module]

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, **attn_kwargs) -> torch.Tensor:
        """Args: x: (B, N, D) tokens. Returns: (B, N - merge_r, D)."""
        state = self.token_state
        if state is not None and state.attn_bias is not None:
            attn_mask = state.attn_bias if attn_mask is None else attn_mask + state.attn_bias
        variant = self.dyt_variant
        if variant is None or variant == "mlp":
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, **attn_kwargs)))
            active = None
        else:
            active = self._dispatch(x, self.dispatcher)
            x = x + self._gated_attention(x, active, attn_mask)
        if self.merge_r > 0 and state is not None:
            x = self._merge(x, state)
        if variant is None or variant == "attn":
            out = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        else:
            if variant != "layer":  # "layer" reuses the block's one decision
                active = self._dispatch(x, self.mlp_dispatcher if variant == "attn_mlp" else self.dispatcher)
            out = x + self._gated_mlp(x, active)
        if self.adapter is not None:
            out = out + self.adapter(x)
        return out

    def _merges_for(self, num_tokens: int) -> int:
        """merge_r, clipped to what ``num_tokens`` tokens allow."""
        return min(self.merge_r, max_merges(num_tokens, self.num_prefix_tokens))

    def _take_keys(self) -> torch.Tensor:
        """(B, H, N, hd) the keys this block's attention just used, kept by KeepKeys (and let go)."""
        kept = self.attn.k_norm.__dict__  # KeepKeys stores there directly (see there)
        keys, kept["tieta_keys"] = kept["tieta_keys"], None
        return keys

    def _merge(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        keys = self._take_keys()
        if not state.trace_source and native_merge_applies(keys, x, self.pyra):
            merged = native_merge(keys, x, state.size, self._merges_for(x.shape[1]), self.num_prefix_tokens, self.pyra)
            if merged is not None:  # None: no compiler here; the tensor code below does the same
                x, state.size, size_bias = merged
                state.attn_bias = size_bias if state.prop_attn else None
                return x
        # the sum over heads is the spec's mean up to a factor that the cosine similarity ignores
        matching = bipartite_soft_matching(keys.sum(dim=1), self.merge_r, self.num_prefix_tokens)
        if state.trace_source:
            state.source = merge_source(matching, state.source, x.shape[1])
        x, state.size = merge_wavg(matching, x, state.size, self.pyra)
        if state.prop_attn:
            state.attn_bias = _size_bias(state.size, x)
        return x

    def _dispatch(self, x: torch.Tensor, dispatcher: nn.Module) -> Optional[torch.Tensor]:
        """(B, N, 1) 0/1 mask of active tokens (prefix always active), or None when all are."""
        dispatch = self.dispatch_state
        if dispatch.full:
            return None
        prefix = self.num_prefix_tokens
        mask = dispatch_mask(dispatcher(x[:, prefix:]).squeeze(-1), dispatch.tau, self.training)
        dispatch.masks.append(mask)
        return with_prefix(mask, prefix)

    def _really_skips(self) -> bool:
        return not self.training and self.dispatch_state.real_skip

    def _gated_attention(self, x: torch.Tensor, active: Optional[torch.Tensor],
                         attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        def branch(tokens: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
            return self.drop_path1(self.ls1(self.attn(self.norm1(tokens), attn_mask=mask)))

        if active is None:
            return branch(x, attn_mask)
        if self._really_skips():
            return attend_on_active(branch, x, active[..., 0] > 0, attn_mask)
        keys = key_mask(active[..., 0] > 0, x.dtype)
        return active * branch(x, keys if attn_mask is None else attn_mask + keys)

    def _gated_mlp(self, x: torch.Tensor, active: Optional[torch.Tensor]) -> torch.Tensor:
        def branch(tokens: torch.Tensor) -> torch.Tensor:
            return self.drop_path2(self.ls2(self.mlp(self.norm2(tokens))))

        if active is None:
            return branch(x)
        if self._really_skips():
            return run_on_active(branch, x, active[..., 0] > 0)
        return active * branch(x)


def _size_bias(size: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log(size) per key as an additive attention mask (B, 1, 1, N), in the dtype attention runs in."""
    bias = size.log().view(size.shape[0], 1, 1, size.shape[1])
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    return bias if bias.dtype == dtype else bias.to(dtype)


class TietaViTMixin:
    """Turns a timm VisionTransformer's forward into one that resets the shared token state first,
    and weights average pooling by token size (the MAE-style heads need it once tokens are merged)."""

    token_state: Optional[TokenState]

    def forward(self, *args, **kwargs):
        if self.token_state is not None:
            self.token_state.reset()
        if self.dispatch_state is not None:
            self.dispatch_state.reset()
        return super().forward(*args, **kwargs)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        size = None if self.token_state is None else self.token_state.size
        if size is None or pool_type != "avg" or self.attn_pool is not None:
            return super().pool(x, pool_type)
        prefix = self.num_prefix_tokens
        weights = size[:, prefix:]  # (B, N - prefix, 1)
        return (x[:, prefix:] * weights).sum(dim=1) / weights.sum(dim=1)


_MIXED_CLASSES: dict[tuple[type, type], type] = {}


def mixed_class(mixin: type, cls: type, prefix: str) -> type:
    """``class <prefix><cls>(mixin, cls)``, made once per pair (for in-place class swaps)."""
    if (mixin, cls) not in _MIXED_CLASSES:
        _MIXED_CLASSES[mixin, cls] = type(f"{prefix}{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _MIXED_CLASSES[mixin, cls]


def check_vit(model: nn.Module) -> None:
    """Raise a TietaError unless ``model`` is a timm VisionTransformer made of pre-norm ``Block``s."""
    if not isinstance(model, VisionTransformer):
        raise TietaError(
            f"tieta works on timm VisionTransformer models, and this model is a {type(model).__name__}"
        )
    for index, block in enumerate(model.blocks):
        if type(block) not in (Block, TietaBlock):
            raise TietaError(
                f"block {index} of this ViT is a {type(block).__name__}; tieta supports timm's pre-norm "
                "vision_transformer.Block only"
            )


def patch_blocks(model: nn.Module) -> list[TietaBlock]:
    """Make the model and its blocks tieta's (idempotent, in place) and return the blocks.

    The class swaps keep every submodule, parameter and state-dict key as timm made them.
    """
    check_vit(model)
    if not isinstance(model, TietaViTMixin):
        model.__class__ = mixed_class(TietaViTMixin, type(model), "Tieta")
        model.token_state = None
        model.dispatch_state = None
    blocks = []
    for block in model.blocks:
        if type(block) is Block:
            block.__class__ = TietaBlock
            block.adapter = None
            block.pyra = None
            block.merge_r = 0
            block.token_state = None
            block.dispatcher = None
            block.mlp_dispatcher = None
            block.dyt_variant = None
            block.dispatch_state = None
            block.num_prefix_tokens = model.num_prefix_tokens
        blocks.append(block)
    return blocks


class KeepKeys:
    """Mixed into the class of ``attn.k_norm`` (Identity or a norm): keeps the keys attention uses,
    after q/k norm, (B, H, N, hd), for the block's merge.

    A class swap rather than a forward hook: hooks send every call through torch's slow path, and
    storing on the module itself keeps copies of the model correct.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = super().forward(x)
        # into the instance dict: nn.Module.__setattr__ costs microseconds that batch-1 latency feels
        self.__dict__["tieta_keys"] = keys
        return keys


def _keep_keys(module: nn.Module, keep: bool) -> None:
    cls = type(module)
    if keep and not isinstance(module, KeepKeys):
        module.__class__ = mixed_class(KeepKeys, cls, "KeepKeys")
        module.tieta_keys = None
    elif not keep and isinstance(module, KeepKeys):
        module.__class__ = cls.__mro__[2]  # the original class, after KeepKeys
        del module.tieta_keys


def enable_token_merging(model: nn.Module, schedule: list[int], prop_attn: bool = True) -> TokenState:
    """Give the blocks their per-layer merge counts and a shared TokenState (in place).

    Args:
        schedule: r per block (validated by the caller).
    """
    blocks = patch_blocks(model)
    state = model.token_state or TokenState()
    state.prop_attn = prop_attn
    model.token_state = state
    for block, r in zip(blocks, schedule):
        block.merge_r = int(r)
        block.token_state = state
        _keep_keys(block.attn.k_norm, keep=r > 0)
    return state


__all__ = ["TietaBlock", "TokenState", "check_vit", "patch_blocks", "enable_token_merging"]

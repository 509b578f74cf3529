"""The one place that changes how a timm ViT runs: a block with slots that methods fill.

tieta never copies timm's attention or MLP code: a block keeps its own ``norm1``, ``attn``, ``ls1``,
``drop_path1``, ``norm2``, ``mlp``, ``ls2`` and ``drop_path2`` modules, and only the order in which
the block calls them is restated here, with a slot for each kind of addition:

    x = select(x)                                   # before the block: DynamicViT's pruning
    x = x + attn_gate(x, attention, mask)           # attention on every token, or DyT's dispatch
    x = reduce(x)                                   # after the attention residual: ToMe, PYRA, EViT, DiffRate
    x = x + mlp_gate(x, feed_forward) + adapter(x)  # the MLP on every token, or DyT's dispatch; AdaptFormer

A method fills its slot when it is attached (timm's way: an empty slot is a pass-through module),
so the forward pass has no switches. ``attention`` adds the token state's attention bias (log size,
for proportional attention) and, while a pruning policy masks tokens in training, runs the masked
softmax that the policy's gradient needs. ``adapter`` is None when off: a parallel branch that is
off adds nothing, not zeros.

With every slot empty, a patched model computes exactly what timm computes.

timm's ``Eva`` models (EVA-02, the rope ViTs) get the same slots in :class:`TietaEvaBlock`; their
rotary position embeddings follow the tokens that reductions keep (``follow_tokens``, see
``tieta.ops.rope``), and what ranks tokens by attention sees the rotated queries and keys
(``rotated``).

The model itself gets :class:`TietaViT` mixed into its class: it resets the per-pass state
(token sizes, masks) whenever a new token sequence starts, whichever timm entry point started it,
and weights average pooling by token size. What tieta keeps on the model is one
:class:`~tieta.methods.state.ModelState` (``tieta.methods.state``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from timm.models._features import feature_take_indices
from timm.models.eva import Eva, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer

from tieta.errors import TietaError
from tieta.methods.attention import masked_attention, masked_eva_attention
from tieta.methods.restore import DenseRestore, destinations, matching_destinations
from tieta.methods.state import (STATE_ATTRIBUTE, ModelState, PassState, attention_gate, reset_pass_states,
                                 state_of)
from tieta.methods.swap import Swappable, swap_in, swap_out
from tieta.ops.merging import Matching
from tieta.ops.rope import follow, rope_at, rotate

Branch = Callable[..., torch.Tensor]


@dataclass
class TokenState(PassState):
    """What the blocks of one forward pass share about the current tokens.

    Attributes:
        size: (B, N, 1) input patches per token, None until the first merge.
        attn_bias: (B, 1, 1, N) log(size), the proportional-attention mask for the next block.
        source: (B, N, N0) input tokens held by each token, when ``trace_source`` is on.
        policy: (B, N) 0/1 keep mask of a pruning method in training (tokens stay in the tensor
            and are masked out of attention), with its straight-through gradient; None otherwise.
        prop_attn: add log(size) to the attention logits (proportional attention).
        trace_source: keep ``source`` (for visualising merges; costs memory).
        features: the (B, N, D) features this pass ended with, which the pool weights belong to.
        rope_follows: the model rotates queries and keys by position (an Eva with rope), so
            reductions record where the tokens they keep stand (``positions``).
        positions: (B, N - prefix) grid position of each patch token once a reduction has changed
            them (``tieta.ops.rope``), None before.
        rope: the rope rows the current block's attention used, for steps that rank by attention.
        dense: a :class:`~tieta.methods.restore.DenseRestore` while a dense output is wanted
            (``forward_intermediates(..., output_fmt="NCHW")``): reductions then record where the
            tokens go; None otherwise (nothing recorded). Set for a call, not reset per pass.
    """

    prop_attn: bool = True
    trace_source: bool = False
    size: Optional[torch.Tensor] = None
    attn_bias: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    policy: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None
    rope_follows: bool = False
    positions: Optional[torch.Tensor] = None
    rope: Optional[torch.Tensor] = None
    dense: Optional[DenseRestore] = None

    def follows_tokens(self) -> bool:
        """Whether reductions must report where the tokens go (rope positions, or a dense output)."""
        return self.rope_follows or self.dense is not None

    def reset(self) -> None:
        self.size, self.attn_bias, self.source, self.policy, self.features = None, None, None, None, None
        self.positions, self.rope = None, None

    def pool_weights(self) -> Optional[torch.Tensor]:
        """(B, N, 1) weights of each token in an average pool (size x policy), None for uniform."""
        weights = self.size
        if self.policy is not None:
            policy = self.policy[..., None].to(self.policy.dtype)
            weights = policy if weights is None else weights * policy
        return weights


class Unchanged(nn.Module):
    """An empty ``select`` or ``reduce`` slot: tokens pass unchanged (nn.Identity, with the block as
    context, which the filled slots read)."""

    def forward(self, x: torch.Tensor, block: "TietaBlock") -> torch.Tensor:
        return x


class EveryToken(nn.Module):
    """An empty gate: the branch runs on every token."""

    def forward(self, x: torch.Tensor, branch: Branch, mask: Optional[torch.Tensor], block: "TietaBlock") -> torch.Tensor:
        return branch(x, mask)


def through_slots(block: nn.Module, x: torch.Tensor, attention: Branch, attn_mask: Optional[torch.Tensor]
                  ) -> torch.Tensor:
    """The slots' order after ``select``, shared by the ViT and the Eva block: the attention
    residual through ``attn_gate``, ``reduce``, then the MLP residual through ``mlp_gate`` and the
    adapter beside it. Args: x: (B, N, D). Returns: (B, N', D)."""
    x = x + block.attn_gate(x, attention, attn_mask, block)
    x = block.reduce(x, block)
    out = x + block.mlp_gate(x, block.feed_forward, None, block)
    if block.adapter is not None:
        out = out + block.adapter(x)
    return out


class TietaBlock(Block):
    """timm's pre-norm ``Block`` with slots for tieta's methods (see the module docstring).

    Attributes:
        select, reduce: token selection before the block and token reduction after the attention
            residual, called as ``slot(x, block)``; :class:`Unchanged` when empty.
        attn_gate, mlp_gate: which tokens the attention / MLP branch runs on, called as
            ``gate(x, branch, mask, block)``; :class:`EveryToken` when empty.
        adapter: a module parallel to the MLP, fed the stream after the attention residual (and
            reduction); not under LayerScale or drop-path (as in AdaptFormer's code). None when off.
        token_state: the model's shared TokenState, once a method that changes tokens is attached.
        num_prefix_tokens: leading tokens (class, distillation, registers) that methods protect.
    """

    adapter: Optional[nn.Module]
    token_state: Optional[TokenState]

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, **attn_kwargs) -> torch.Tensor:
        """Args: x: (B, N, D) tokens. Returns: (B, N', D), N' the tokens the slots leave."""
        x = self.select(x, self)
        state = self.token_state
        if state is not None and state.attn_bias is not None:
            attn_mask = state.attn_bias if attn_mask is None else attn_mask + state.attn_bias
        attention = functools.partial(self.attention, **attn_kwargs) if attn_kwargs else self.attention
        return through_slots(self, x, attention, attn_mask)

    def attention(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, **attn_kwargs) -> torch.Tensor:
        """The attention branch, ``drop_path1(ls1(attn(norm1(x))))``, on the tokens it is given.

        Args: x: (B, N, D); attn_mask: additive (B, 1, 1, N) or (B, H, N, N) mask, or None.
        """
        state = self.token_state
        if state is not None and state.policy is not None:
            out = masked_attention(self.attn, self.norm1(x), state.policy, attn_mask)
        else:
            out = self.attn(self.norm1(x), attn_mask=attn_mask, **attn_kwargs)
        return self.drop_path1(self.ls1(out))

    def feed_forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The MLP branch, ``drop_path2(ls2(mlp(norm2(x))))`` (``mask`` is unused: gates share one call form)."""
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class TietaEvaBlock(EvaBlock):
    """timm's pre-norm ``EvaBlock`` (EVA-02, the rope ViTs) with the same slots as :class:`TietaBlock`.

    The block keeps timm's ``norm1``, ``attn`` (EvaAttention or AttentionRope: fused or separate
    q/k/v, sub-LayerNorm, rotary embedding), ``gamma_1``, ``drop_path1``, ``norm2``, ``mlp``
    (SwiGLU or not), ``gamma_2`` and ``drop_path2``; this restates only ``EvaBlock.forward``'s order
    of calls (timm 1.0: LayerScale as an optional ``gamma * branch``), pinned by the parity tests.

    The rope timm passes in covers the full patch grid; once a reduction has recorded where the
    remaining tokens stand (``token_state.positions``), the block takes those rows (per image).
    """

    adapter: Optional[nn.Module]
    token_state: Optional[TokenState]
    # DyT's real skipping packs the active tokens: the attention branch needs their order to
    # take their rope rows (tieta.ops.dispatch.attend_on_active)
    attends_by_position = True

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """Args: x: (B, N, D) tokens; rope: the pass's rope rows (tieta.ops.rope). Returns: (B, N', D)."""
        x = self.select(x, self)
        state = self.token_state
        if state is not None:
            if state.attn_bias is not None:
                attn_mask = state.attn_bias if attn_mask is None else attn_mask + state.attn_bias
            if rope is not None and state.positions is not None:
                rope = rope_at(rope, state.positions)  # (B, 1 or H, N - prefix, d)
            state.rope = rope
        attention = functools.partial(self.attention, rope=rope, is_causal=is_causal)
        return through_slots(self, x, attention, attn_mask)

    def attention(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, order: Optional[torch.Tensor] = None,
                  rope: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        """The attention branch, ``drop_path1(gamma_1 * attn(norm1(x), rope))``, on the tokens it is given.

        Args: x: (B, N, D); attn_mask: additive mask or None; order: (B, N) which of the block's
            tokens ``x`` holds (DyT's packed active tokens), None for all in order.
        """
        if rope is not None and order is not None:
            prefix = self.num_prefix_tokens
            rope = rope_at(rope, order[:, prefix:] - prefix)
        state = self.token_state
        if state is not None and state.policy is not None:
            out = masked_eva_attention(self.attn, self.norm1(x), state.policy, attn_mask, rope)
        else:
            out = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        if self.gamma_1 is not None:
            out = self.gamma_1 * out
        return self.drop_path1(out)

    def feed_forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The MLP branch, ``drop_path2(gamma_2 * mlp(norm2(x)))`` (``mask`` is unused)."""
        out = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            out = self.gamma_2 * out
        return self.drop_path2(out)


def follow_tokens(block: nn.Module, index: torch.Tensor, patches: int, into: Optional[torch.Tensor] = None) -> None:
    """Record, after a reduction, which of the ``patches`` patch tokens before it each patch token
    after it continues (its own index, its merge destination's, or ``NO_POSITION``), so that rotary
    embeddings follow the tokens (tieta.ops.rope), and, while a dense output is wanted, where each
    token went (tieta.methods.restore); nothing otherwise.

    Args: index: (B, P') indices among the patch tokens (prefix tokens not counted);
        into: (B, patches) the new patch token each old one continues or was merged into, -1 if
        dropped; None: each old token that ``index`` names continues, the others are dropped.
    """
    state = block.token_state
    if state is not None and state.rope_follows:
        state.positions = follow(state.positions, index, patches)
    if state is not None and state.dense is not None:
        state.dense.follow(destinations(index, patches) if into is None else into, index.shape[1])


def follow_matching(block: nn.Module, matching: Matching, batch: int, tokens: int, prefix: int, merged: bool = True
                    ) -> None:
    """:func:`follow_tokens` after a bipartite matching (ToMe, PYRA, PiToMe, ToFu, DTEM): a kept token
    keeps its own position, a merged one its destination's; ``merged`` False: the sources are dropped."""
    kept = matching.kept_rows.view(batch, -1) - torch.arange(batch, device=matching.kept_rows.device)[:, None] * tokens
    state = block.token_state
    into = None
    if state is not None and state.dense is not None:
        into = matching_destinations(matching, batch, tokens, prefix, merged)
    follow_tokens(block, kept[:, prefix:] - prefix, tokens - prefix, into)


def rotated(block: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Queries or keys kept from ``q_norm`` / ``k_norm`` (B, H, N, hd) as the block's attention used
    them: rotated by the block's rope on an Eva with rope, unchanged otherwise."""
    state = block.token_state
    rope = None if state is None else state.rope
    if rope is None:
        return t
    return rotate(t, rope, block.num_prefix_tokens, getattr(block.attn, "rotate_half", False))


class TietaViT(Swappable):
    """Mixed into a timm VisionTransformer's (or Eva's) class by :func:`patch_blocks`.

    - Every timm entry point (``forward``, ``forward_features``, ``forward_intermediates``,
      ``get_intermediate_layers``) starts a token sequence in ``_pos_embed``; the per-pass states
      (token sizes, masks, decisions) are reset there, so entry points can be used in any order.
    - Average pooling weights each token by its size (and a training policy's mask).
    - ``forward_intermediates`` gives the tokens as they are after merging or pruning with
      ``output_fmt="NLC"``. With ``output_fmt="NCHW"`` (timm's default) on a model that reduces
      tokens, every intermediate is put back on the full (B, C, H, W) patch grid and the final
      normed tokens on (B, prefix + H * W, C) (``tieta.methods.restore``): a merged position takes
      the value of the token it was merged into (ToMe's unmerge), a dropped position keeps the value
      it had when it was dropped; a fused token (EViT's, SPViT's package) is left out. Only such a
      call records where the tokens go; the other entry points pay nothing for it.
    """

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        reset_pass_states(self)
        return super()._pos_embed(x)

    def __getattr__(self, name: str) -> Any:
        # parameters, buffers and submodules first (nn.Module's); then a pass state or a method
        # setting of that name in the model's state, read-only (model.token_state, model.token_schedule)
        try:
            return super().__getattr__(name)
        except AttributeError as missing:
            state = state_of(self)
            if state is None:
                raise
            try:
                return state.view(name)
            except KeyError:
                raise missing from None

    def forward_features(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._ended_with(super().forward_features(x, *args, **kwargs))

    def _ended_with(self, features: torch.Tensor) -> torch.Tensor:
        """Record the features a pass ended with: the token sizes for pooling belong to them."""
        state = token_state_of(self)
        if state is not None:
            state.features = features
        return features

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        state = token_state_of(self)
        weights = None if state is None else state.pool_weights()
        if weights is None or pool_type != "avg" or self.attn_pool is not None:
            return super().pool(x, pool_type)
        if x is not state.features:
            raise TietaError("an average-pool head weights tokens by the sizes of the pass that made them: call "
                             "forward_head on the features of this model's last forward_features")
        prefix = self.num_prefix_tokens
        weights = weights[:, prefix:].to(x.dtype)  # (B, N - prefix, 1)
        # the floor only acts when a training policy masked every token of an image (0, not NaN)
        return (x[:, prefix:] * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-6)

    def forward_intermediates(self, x: torch.Tensor, *args, output_fmt: str = "NCHW", **kwargs):
        method = reducing_method(self)
        if output_fmt == "NCHW" and method is not None:
            return self._dense_intermediates(x, args, kwargs, method)
        out = super().forward_intermediates(x, *args, output_fmt="NLC", **kwargs)
        if isinstance(out, dict) and "image_features" in out:
            self._ended_with(out["image_features"])
        elif isinstance(out, tuple):
            self._ended_with(out[0])
        return out if output_fmt != "NCHW" else _to_nchw(out, self, x.shape[-2:])

    def _dense_intermediates(self, x: torch.Tensor, args: tuple, kwargs: dict, method: str) -> Any:
        """forward_intermediates in NCHW on a model that reduces tokens: the pass records where its
        tokens go (hooks on the reduction slots and blocks, for this call only), then every output
        is put back on the full patch grid (``tieta.methods.restore``)."""
        intermediates_of = super().forward_intermediates
        call = inspect.signature(intermediates_of).bind(x, *args, output_fmt="NLC", **kwargs)
        call.apply_defaults()
        taken, _ = feature_take_indices(len(self.blocks), call.arguments.get("indices"))
        dense = DenseRestore(self.num_prefix_tokens, method)
        state = token_state(self)
        hooks = []
        for index, block in enumerate(self.blocks):
            for slot in (block.select, block.reduce):
                hooks.append(slot.register_forward_pre_hook(lambda module, inputs: dense.enter(inputs[0])))
            hooks.append(block.register_forward_hook(
                lambda module, inputs, out, index=index: dense.block_done(index, out)))
        state.dense = dense
        try:
            out = intermediates_of(*call.args, **call.kwargs)
        finally:
            state.dense = None
            for hook in hooks:
                hook.remove()
        return _to_nchw(_restored(out, self, dense, taken, bool(call.arguments.get("norm"))), self, x.shape[-2:])


def _restored(out: Any, model: VisionTransformer, dense: DenseRestore, taken: list[int], norm: bool) -> Any:
    """forward_intermediates' NLC output (list, (final, list) or dict) with every intermediate's
    patch tokens and the final tokens on the full patch grid."""
    blocks = [index for index in sorted(dense.grids) if index in taken]  # timm's order of the intermediates
    intermediate_norm = model.norm if norm else None

    def grids(items: list) -> list:
        restored = []
        for item, index in zip(items, blocks):
            if isinstance(item, tuple):  # (patch tokens, prefix tokens) with return_prefix_tokens
                restored.append((dense.restore(item[0], index, intermediate_norm), item[1]))
            else:
                restored.append(dense.restore(item, index, intermediate_norm))
        return restored

    def final(tokens: torch.Tensor) -> torch.Tensor:
        model._ended_with(tokens)  # pooling weights belong to the tokens as the pass left them
        prefix = model.num_prefix_tokens
        patches = dense.restore(tokens[:, prefix:], max(dense.grids), model.norm)
        return torch.cat([tokens[:, :prefix], patches], dim=1)

    if isinstance(out, dict):
        out["image_intermediates"] = grids(out["image_intermediates"])
        if "image_features" in out:
            out["image_features"] = final(out["image_features"])
        return out
    if isinstance(out, tuple):
        return final(out[0]), grids(out[1])
    return grids(out)


def _to_nchw(out: Any, model: VisionTransformer, image_size: tuple[int, int]) -> Any:
    """Reshape forward_intermediates' NLC patch tokens (B, L, C) to (B, C, H, W), refusing tokens
    that no longer form the patch grid."""
    grid_h, grid_w = model.patch_embed.dynamic_feat_size(tuple(image_size))

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] != grid_h * grid_w:
            raise TietaError(
                f"an intermediate holds {tokens.shape[1]} tokens after merging or pruning, not the "
                f"{grid_h}x{grid_w} patch grid; use forward_intermediates(..., output_fmt='NLC')"
            )
        return tokens.reshape(tokens.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()

    def convert(item: Any) -> Any:
        if isinstance(item, tuple):  # (patch tokens, prefix tokens) with return_prefix_tokens
            return (reshape(item[0]), item[1])
        return reshape(item)

    if isinstance(out, dict):
        out["image_intermediates"] = [convert(i) for i in out["image_intermediates"]]
        return out
    if isinstance(out, tuple):
        final, intermediates = out
        return final, [convert(i) for i in intermediates]
    return [convert(i) for i in out]


def check_vit(model: nn.Module) -> None:
    """Raise a TietaError unless ``model`` is a timm VisionTransformer made of pre-norm ``Block``s
    or a timm Eva (EVA-02, the rope ViTs) made of pre-norm ``EvaBlock``s."""
    if type(model).__name__ == "VisionTransformerSAM":
        raise TietaError("tieta does not work on SAM's image encoder: its windowed attention needs the full patch "
                         "grid, which merging and pruning take apart")
    if isinstance(model, Eva):
        for index, block in enumerate(model.blocks):
            if type(block) not in (EvaBlock, TietaEvaBlock):
                raise TietaError(f"block {index} of this Eva is a {type(block).__name__}; tieta supports timm's "
                                 "pre-norm eva.EvaBlock only")
        return
    if not isinstance(model, VisionTransformer):
        raise TietaError(
            f"tieta works on timm VisionTransformer and Eva models, and this model is a {type(model).__name__}"
        )
    for index, block in enumerate(model.blocks):
        if type(block) not in (Block, TietaBlock):
            raise TietaError(
                f"block {index} of this ViT is a {type(block).__name__}; tieta supports timm's pre-norm "
                "vision_transformer.Block only"
            )


def patch_blocks(model: nn.Module) -> list[nn.Module]:
    """Make the model and its blocks tieta's (idempotent, in place) and return the blocks.

    The class swaps keep every submodule, parameter and state-dict key as timm made them.
    """
    check_vit(model)
    if not isinstance(model, TietaViT):
        swap_in(model, TietaViT)
        setattr(model, STATE_ATTRIBUTE, ModelState())
    blocks = []
    for block in model.blocks:
        if type(block) in (Block, EvaBlock):
            block.__class__ = TietaBlock if type(block) is Block else TietaEvaBlock
            block.select, block.reduce = Unchanged(), Unchanged()
            block.attn_gate, block.mlp_gate = EveryToken(), EveryToken()
            block.adapter = None
            block.token_state = None
            block.num_prefix_tokens = model.num_prefix_tokens
        blocks.append(block)
    return blocks


def pass_state(model: nn.Module, name: str, factory: Callable[[], Any]) -> Any:
    """The model's per-pass state called ``name`` (``model.<name>`` reads it), made by ``factory``
    and kept in the model's state, reset at the start of every pass, if the model has none yet.

    A state is a :class:`PassState` (a ``reset()`` method), shared by the blocks that read or write it.
    """
    patch_blocks(model)
    passes = state_of(model).passes
    if name not in passes:
        passes[name] = factory()
    return passes[name]


def token_state_of(model: nn.Module) -> Optional[TokenState]:
    """The model's TokenState if a method made one, else None (nothing made)."""
    state = state_of(model)
    return None if state is None else state.passes.get("token_state")


def token_state(model: nn.Module) -> TokenState:
    """The model's shared TokenState (made on first use) and each block's reference to it."""
    state = pass_state(model, "token_state", TokenState)
    state.rope_follows = getattr(model, "rope", None) is not None
    for block in model.blocks:
        block.token_state = state
    return state


def reducing_method(model: nn.Module) -> Optional[str]:
    """The name of the method that already changes the token count of ``model``, if any."""
    state = state_of(model)
    return None if state is None else state.reduction


def claim_reduction(model: nn.Module, method: str) -> None:
    """Record that ``method`` changes the token count; refuse a second such method, whose token
    bookkeeping (sizes, orders, masks) would contradict the first's, and a gate that lets only some
    tokens attend (reduction needs every token's attention)."""
    current = reducing_method(model)
    if current is not None and current != method:
        raise TietaError(f"this model already reduces tokens with {current}; one token-reduction method per model")
    gate = attention_gate(model)
    if gate is not None:
        raise TietaError(f"{gate} cannot be combined with token merging or pruning ({method}); use DyT's variant 'mlp'")
    patch_blocks(model)
    state_of(model).reduction = method



def claim_attention_gate(model: nn.Module, what: str) -> None:
    """Record that ``what`` lets only some tokens attend, refusing it on a model that reduces tokens."""
    current = reducing_method(model)
    if current is not None:
        raise TietaError(f"{what} cannot be combined with token merging or pruning ({current}); use DyT's variant 'mlp'")
    patch_blocks(model)
    state_of(model).attention_gate = what


class KeepOutput(Swappable):
    """Mixed into the class of ``attn.k_norm`` / ``attn.q_norm`` (Identity or a norm): keeps the
    keys or queries attention uses, after q/k norm, (B, H, N, hd), for a step later in the block.

    A class swap rather than a forward hook: hooks send every call through torch's slow path, and
    storing on the module itself keeps copies of the model correct.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        # into the instance dict: nn.Module.__setattr__ costs microseconds that batch-1 latency feels
        self.__dict__["tieta_output"] = out
        return out

    def __getstate__(self) -> dict:
        # the kept tensor belongs to one pass: copies and pickles start without it
        return {**super().__getstate__(), "tieta_output": None}


def keep_output(module: nn.Module) -> None:
    """Make ``module`` (a q_norm or k_norm) keep its last output for :func:`take_output`."""
    if not isinstance(module, KeepOutput):
        swap_in(module, KeepOutput)
        module.__dict__["tieta_output"] = None


def release_output(module: nn.Module) -> None:
    """Undo :func:`keep_output`."""
    if isinstance(module, KeepOutput):
        swap_out(module, KeepOutput)
        module.__dict__.pop("tieta_output", None)


def take_output(module: nn.Module) -> torch.Tensor:
    """The tensor ``module`` kept in this pass (and let go of it)."""
    kept = module.__dict__
    out, kept["tieta_output"] = kept["tieta_output"], None
    return out


__all__ = ["PassState", "TietaBlock", "TietaEvaBlock", "TietaViT", "TokenState", "check_vit", "patch_blocks", "pass_state",
           "token_state"]

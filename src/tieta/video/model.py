"""The video model: an image backbone on every frame, the frames' tokens joined, one attentive
pooling, then the classifier (DyT's video model, ``video_models/video_vision_transformer_IN21K.py``).

    clips (B, T, 3, H, W) -> frames (B*T, 3, H, W)
      -> the backbone's final tokens after its last norm (B*T, N', C)     every token: prefix and patches
      -> joined per clip (B, T*N', C)                                     frame-major: frame 0's tokens first
      -> attentive pooling (tieta.video.pooling) -> (B, C) -> classifier -> (B, classes)

The backbone is any timm ViT tieta builds, with any of its methods attached before it is wrapped
(DyT's dispatchers, ToMe or PYRA, EViT, LoRA, adapters...): it runs each frame as an image, so N'
is what the method leaves of a frame's tokens (a token reducer fewer, DyT all of them). As in DyT's
code, every token of every frame enters the pooling, the class token of each frame included, and
the backbone's ``fc_norm`` and head dropout (identities for a class-token ViT) come before it.

The classifier is the backbone's own head, moved beside the pooling into ``head``
(:class:`VideoHead`), so that the pooling's parameters are in the head's parameter group: trained
with the classifier at the base learning rate, as DyT's code trains these new parameters, and
saved in every checkpoint. The backbone's frozen or trainable split stays its method's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ContextManager, Optional

import torch
from torch import nn

from tieta import shard
from tieta.errors import TietaError
from tieta.methods import registry
from tieta.methods.params import freeze_backbone
from tieta.methods.state import share_state, state_of
from tieta.video.config import is_video
from tieta.video.pooling import AttentivePooling

# a method's token decisions on a batch: (model, inputs) -> [(B, N_patches) bool, ...]
TokenMasks = Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]


class VideoHead(nn.Module):
    """The attentive pooling and the classifier after it.

    Attributes:
        pool: :class:`tieta.video.pooling.AttentivePooling` over a clip's tokens.
        fc: the classifier, (C) -> (classes).
    """

    def __init__(self, pool: AttentivePooling, fc: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        self.fc = fc

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Args: tokens: (B, M, C), a clip's tokens. Returns: (B, classes) logits."""
        return self.fc(self.pool(tokens))


class VideoModel(nn.Module):
    """An image backbone applied to every frame of a clip, its tokens pooled attentively.

    Args:
        backbone: a timm VisionTransformer (tieta's methods attached already); its classifier
            ``head`` moves into this model's ``head.fc`` and leaves an ``nn.Identity`` behind.
        frames: the frames of the clips it is built for (recorded for rebuilding and measuring; the
            forward pass takes any number).
        pool_heads: attention heads of the pooling; None: the backbone's.
        pool_qkv_bias: learned query and value biases in the pooling.

    Attributes:
        backbone: the per-frame model (its blocks, dispatchers, token state as the methods left them).
        head: :class:`VideoHead`: ``head.pool`` then ``head.fc``.
    """

    def __init__(self, backbone: nn.Module, frames: int, pool_heads: Optional[int] = None,
                 pool_qkv_bias: bool = True) -> None:
        super().__init__()
        if not hasattr(backbone, "forward_features") or not isinstance(getattr(backbone, "head", None), nn.Module):
            raise TietaError(f"a video model needs a timm ViT with forward_features and a head, got "
                             f"{type(backbone).__name__}")
        if getattr(backbone, "head_dist", None) is not None:
            raise TietaError("a video model takes a backbone with one classifier; a distilled ViT has two")
        if frames < 1:
            raise TietaError(f"a video model needs at least one frame per clip, got {frames}")
        width = backbone.num_features
        heads = pool_heads if pool_heads is not None else backbone.blocks[0].attn.num_heads
        like = next(backbone.parameters())
        self.frames = frames
        fc = backbone.head
        backbone.head = nn.Identity()
        self.backbone = backbone
        self.head = VideoHead(AttentivePooling(width, heads, pool_qkv_bias).to(like.device, like.dtype), fc)
        # the backbone's input settings (mean, std, size) describe the frames this model takes
        self.pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
        self.share_state()

    def extra_repr(self) -> str:
        return f"frames={self.frames}"

    def share_state(self) -> None:
        """Let tieta's accessors (``dyt_forward``, ``activation_rates``...) find the backbone's state
        on this model: both hold the one object (a method attached to the backbone after wrapping
        is seen from the next forward pass on)."""
        share_state(self, self.backbone)

    @property
    def num_classes(self) -> int:
        return int(self.head.fc.out_features) if isinstance(self.head.fc, nn.Linear) else 0

    def no_weight_decay(self) -> set[str]:
        """The backbone's own no-decay names (``pos_embed``, ``cls_token``...), as named here."""
        skip = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{name}" for name in skip()} if callable(skip) else set()

    def frame_tokens(self, clips: torch.Tensor) -> torch.Tensor:
        """Each frame's final tokens. Args: clips: (B, T, 3, H, W). Returns: (B, T, N', C)."""
        if clips.ndim != 5:
            raise TietaError(f"a video model takes clips shaped (batch, frames, 3, height, width), got a tensor of "
                             f"shape {tuple(clips.shape)}")
        self.share_state()
        batch, frames = clips.shape[:2]
        backbone = self.backbone
        with frames_shard(frames):
            tokens = backbone.forward_features(clips.flatten(0, 1))  # (B*T, N', C), after the backbone's norm
        tokens = backbone.head_drop(backbone.fc_norm(tokens))
        return tokens.reshape(batch, frames, *tokens.shape[1:])

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Args: clips: (B, T, 3, H, W). Returns: (B, classes) logits."""
        tokens = self.frame_tokens(clips)  # (B, T, N', C)
        return self.head(tokens.flatten(1, 2))  # the frames' tokens joined: (B, T*N', C)


def frames_shard(frames: int) -> ContextManager[None]:
    """In data-parallel training, the backbone's rows are frames: its per-row draws (DyT's Gumbel
    noise, ``tieta.shard.batch_rand``) are drawn for the global batch's frames, clip by clip, so
    that the shards together draw what one process with the whole batch draws."""
    current = shard.current()
    if current is None:
        return contextlib.nullcontext()
    return shard.sharded(dataclasses.replace(current, global_count=current.global_count * frames,
                                             start=current.start * frames, count=current.count * frames))


def frame_backbone(model: nn.Module) -> nn.Module:
    """The ViT a task model wraps, where the methods are attached: a video model's per-frame
    backbone, a segmentation model's backbone; a bare ViT itself."""
    wrapped = getattr(model, "backbone", None)
    # the task models (VideoModel, SegmentationModel) share their backbone's state (share_state)
    return wrapped if isinstance(wrapped, nn.Module) and callable(getattr(model, "share_state", None)) else model


def video_model_for(backbone: nn.Module, config) -> nn.Module:
    """A run's model from its backbone (methods attached, frozen): the backbone itself for an image
    run, the :class:`VideoModel` around it where the settings give ``video.frames``."""
    if not is_video(config):
        return backbone
    video = config.video
    return freeze_backbone(VideoModel(backbone, video.frames, video.pool_heads, video.pool_qkv_bias))


def example_clips(model: VideoModel, batch: int = 1, device=None) -> torch.Tensor:
    """Zeros shaped as the model's clips, (batch, frames, 3, S, S) at its input side S (for counting
    FLOPs and timing)."""
    side = int(model.backbone.patch_embed.img_size[0])
    like = next(model.parameters())
    return torch.zeros(batch, model.frames, 3, side, side, device=device or like.device, dtype=like.dtype)


def frame_token_masks(model: VideoModel, clip: torch.Tensor, token_masks: Optional[TokenMasks] = None
                      ) -> list[torch.Tensor]:
    """Which patch tokens of each frame stay active, per token decision (DyT: per dispatcher, in
    block order), as ``tieta show-tokens`` draws them on the frames.

    Args:
        clip: (T, 3, H, W) one clip, or (1, T, 3, H, W).
        token_masks: a method's ``token_masks`` (``tieta.methods.method.Method``); None: that of the
            method attached to the model that has one.

    Returns:
        One (T, N_patches) bool tensor per decision.

    Raises:
        TietaError: no attached method makes token decisions, or ``clip`` is not one clip.
    """
    if clip.ndim == 5:
        if clip.shape[0] != 1:
            raise TietaError(f"frame_token_masks takes one clip, got a batch of {clip.shape[0]}")
        clip = clip[0]
    if clip.ndim != 4:
        raise TietaError(f"frame_token_masks takes a clip shaped (frames, 3, height, width), got a tensor of shape "
                         f"{tuple(clip.shape)}")
    if token_masks is None:
        token_masks = _attached_token_masks(model)
    return [mask.reshape(clip.shape[0], -1) for mask in token_masks(model, clip[None])]


def _attached_token_masks(model: nn.Module) -> TokenMasks:
    """The ``token_masks`` of the method on ``model`` that makes token decisions (the methods a
    model's state records settings for)."""
    state = state_of(model)
    attached = set() if state is None else set(state.methods)
    showing = [method for name, method in registry.methods().items()
               if name in attached and method.token_masks is not None]
    if not showing:
        raise TietaError("this model has no token decisions to show (no attached method makes them)")
    return showing[0].token_masks

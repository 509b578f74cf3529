"""The ``video:`` section of a run's settings: what turns an image backbone into a video model.

Readable without torch (``tieta --help`` and argument errors are answered without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tieta.errors import TietaError

# frames per clip: DyT's recipe takes 8, VideoMAE's 16; every frame is a whole backbone pass
MAX_FRAMES = 256
# the pooling head's attention heads: at most one per channel of the widest ViTs
MAX_POOL_HEADS = 4096


@dataclass
class VideoConfig:
    """How a video run's model is built (``tieta.video.model.VideoModel``).

    Attributes:
        frames: frames per clip; None for an image run (the backbone alone). DyT's K400 and SSv2
            recipe: 8.
        pool_heads: attention heads of the attentive pooling; None: the backbone's own (as DyT's
            code builds it).
        pool_qkv_bias: learned query and value biases in the pooling's attention (the key bias is
            always zero), as DyT's code with ViT-B's qkv_bias.
    """

    frames: Optional[int] = None
    pool_heads: Optional[int] = None
    pool_qkv_bias: bool = True

    def check(self, prefix: str = "video.") -> None:
        """Raise a TietaError, in one sentence, for settings that cannot work."""
        if self.frames is not None and not 1 <= self.frames <= MAX_FRAMES:
            raise TietaError(f"{prefix}frames, the frames of a clip, must be in 1 .. {MAX_FRAMES}, got {self.frames}")
        if self.pool_heads is not None and not 1 <= self.pool_heads <= MAX_POOL_HEADS:
            raise TietaError(f"{prefix}pool_heads must be in 1 .. {MAX_POOL_HEADS}, got {self.pool_heads}")


def is_video(config) -> bool:
    """Whether a run's settings describe a video model (``video.frames`` given)."""
    video = getattr(config, "video", None)
    return video is not None and video.frames is not None

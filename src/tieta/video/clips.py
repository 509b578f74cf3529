"""Reading a clip: its file inside the task folder, decoded with PyAV into frames, within a limit.

A clip is decoded whole, as the reference's SSv2 loader does it (``container.decode(video=0)``, the
frames ordered by their presentation time), and the frames a sampler picks are then converted to RGB.
What it costs is bounded before and while decoding: frames x width x height may not pass
``max_pixels`` (the header's frame count is checked first, then every decoded frame counts).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tieta.errors import TietaError

CLIP_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv")
# frames x width x height of one clip, at most: ten times a 10-second Kinetics clip (300 frames of
# 340 x 256) and far more than an SSv2 clip; PyAV keeps decoded frames as YUV 4:2:0, 1.5 bytes a pixel
MAX_CLIP_PIXELS = 2**28


def need_av() -> Any:
    """The ``av`` module (PyAV), or TietaError saying which extra installs it."""
    try:
        import av
    except ImportError as error:
        raise TietaError("reading video clips needs PyAV: pip install 'tieta[video]'") from error
    return av


def clip_path(root: Path, name: str, where: str) -> Path:
    """The file a list line or a folder names, checked to stay inside the task folder ``root``.

    Args:
        root: the task folder, resolved.
        name: the path as written (relative to ``root``).
        where: what names it, for the message ("train.txt:3").
    Raises:
        TietaError: ``name`` is absolute, climbs out with ``..``, or leads out of ``root`` through a
            symbolic link.
    """
    if os.path.isabs(name) or os.pardir in Path(os.path.normpath(name)).parts:
        raise TietaError(f"{where}: clip path {name} leaves the task folder")
    path = root / name
    # Unlike an image task's images/ (often a link to other storage), a clip that resolves outside
    # the task is refused: the task folder is the whole of what a video run may read.
    try:
        inside = path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError) as error:  # a loop of links (RuntimeError before Python 3.13)
        raise TietaError(f"{where}: clip path {name} cannot be followed ({error})") from None
    if not inside:
        raise TietaError(f"{where}: clip path {name} leads out of the task folder through a symbolic link")
    return path


@dataclass
class Clip:
    """A decoded clip: its frames in presentation order (PyAV VideoFrames, not yet RGB)."""

    path: Path
    frames: list[Any]

    @property
    def count(self) -> int:
        return len(self.frames)

    def rgb(self, indices: list[int]) -> torch.Tensor:
        """The frames at ``indices`` (repeats allowed) as a (T, 3, H, W) uint8 tensor."""
        converted = {index: self.frames[index].to_ndarray(format="rgb24") for index in set(indices)}
        return torch.from_numpy(np.stack([converted[index] for index in indices])).permute(0, 3, 1, 2)


def read_clip(path: Path, max_pixels: int = MAX_CLIP_PIXELS) -> Clip:
    """Decode every frame of the first video stream of ``path``.

    Raises:
        TietaError: in one sentence, naming the clip: it is missing or not a regular file, is not a
            video (no container PyAV knows, or no video stream), is corrupt or truncated (decoding
            fails, or the file ends before the frames its header lists), has no frames, changes its
            frame size, or has more than ``max_pixels`` frames x pixels.
    """
    av = need_av()
    try:
        found = os.stat(path)
    except OSError as error:
        raise TietaError(f"cannot read clip {path}: {error.strerror}") from None
    if not stat.S_ISREG(found.st_mode):  # a folder, or a FIFO that av.open would wait on forever
        raise TietaError(f"clip {path} is not a regular file")
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise TietaError(f"clip {path} has no video stream")
            stream = container.streams.video[0]
            listed = max(int(stream.frames or 0), 0)
            _check_size(path, listed, stream.width, stream.height, max_pixels, "its header lists")
            by_time: dict[int, Any] = {}
            packets, pixels, size = 0, 0, None
            for packet in container.demux(stream):
                packets += packet.size > 0  # (the last, empty, packet only flushes the decoder)
                for frame in packet.decode():
                    size = size or (frame.width, frame.height)
                    if (frame.width, frame.height) != size:
                        raise TietaError(f"clip {path} changes its frame size from {size[0]} x {size[1]} to "
                                         f"{frame.width} x {frame.height} pixels")
                    pixels += frame.width * frame.height
                    if pixels > max_pixels:
                        _check_size(path, pixels // (frame.width * frame.height), frame.width, frame.height,
                                    max_pixels, "it has at least")
                    by_time[frame.pts if frame.pts is not None else len(by_time)] = frame
    except (av.FFmpegError, ValueError) as error:  # InvalidDataError: not a container it knows, cut short, damaged;
        # a ValueError (UnicodeDecodeError) from metadata that is not text
        raise TietaError(f"cannot read clip {path}: it is corrupt, truncated or not a video "
                         f"({getattr(error, 'strerror', None) or error})") from error
    if not by_time:
        raise TietaError(f"clip {path} has no frames")
    # Packets, not decoded frames: a clip cut without re-encoding may list frames that its edit list
    # hides (they are read, then dropped by the decoder); a truncated file ends before its packets do.
    if packets < listed:
        raise TietaError(f"clip {path} is truncated: its header lists {listed} frames, the file holds {packets}")
    return Clip(path, [by_time[key] for key in sorted(by_time)])


def _check_size(path: Path, frames: int, width: int, height: int, max_pixels: int, counted: str) -> None:
    if frames * width * height > max_pixels:
        raise TietaError(f"clip {path} is too large to decode: {counted} {frames} frames of {width} x {height} "
                         f"pixels, more than the limit of {max_pixels:,} frames x pixels (video.max_pixels)")

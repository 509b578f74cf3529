"""Small video tasks made from real images, for tests and benchmarks: each clip pans or zooms across
one photograph of a VTAB-1k task folder (e.g. vtab-mini's dtd10), and takes that image's class.

The clips are encoded with PyAV (MPEG-4 Part 2 by default, which every FFmpeg build has; yuv420p),
a few kilobytes each, so a task of a few classes is made in about a second.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from tieta.data.vtab import open_task
from tieta.errors import TietaError
from tieta.files import folder_mode, write_file
from tieta.video.clips import need_av

LAYOUTS = ("folders", "lists")


def make_clip_task(root: str | Path, source: str | Path, classes: int = 2, clips_per_class: int = 3,
                   test_clips_per_class: Optional[int] = None, frames: int = 16, size: int = 64,
                   layout: str = "folders", codec: str = "mpeg4", rate: int = 8) -> Path:
    """Write a video task to the new folder ``root`` and return it.

    Clip k of a class comes from that class's k-th image in the source's training list (test clips:
    its test list) and alternates between a pan (left to right across the image, scaled to 1.5 x the
    frame's height) and a zoom (from the whole image to its centre half).

    Args:
        source: a VTAB-1k task folder whose lists have ``classes`` classes with enough images.
        classes: the first this many of the source's classes.
        clips_per_class: training clips; ``test_clips_per_class`` test clips (default: as many).
        frames, size: each clip's frame count and its square frame side, in pixels (even, for yuv420p).
        layout: "folders" (train/<class>/clip_000.mp4, test/...) or "lists" (clips/<class>/*.mp4
            with train.txt and test.txt).
        codec: an FFmpeg encoder PyAV has ("mpeg4", "libx264", "h264").
        rate: frames per second, as the container records it.
    Raises:
        TietaError: ``root`` exists and is not an empty folder, the source has too few classes or
            images, or the settings are out of range.
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise TietaError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if frames < 1 or size < 16 or size % 2 or classes < 1 or clips_per_class < 1:
        raise TietaError("a clip task needs at least 1 class, clip and frame, and an even frame size of at least 16")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise TietaError(f"{root} already exists and is not an empty folder: a clip task is written to a new one")
    task = open_task(source)
    tests = test_clips_per_class or clips_per_class
    lines: dict[str, list[str]] = {"train": [], "test": []}
    for split, split_of_source, count in (("train", "train", clips_per_class), ("test", "test", tests)):
        by_class: dict[int, list[Path]] = {}
        for path, label in task.split(split_of_source):
            by_class.setdefault(label, []).append(path)
        for label in range(classes):
            images = by_class.get(label, [])
            if len(images) < count:
                raise TietaError(f"the {split_of_source!r} split of {source} has {len(images)} images of class "
                                 f"{label}, fewer than the {count} clips asked for")
            for number in range(count):
                motion = "pan" if number % 2 == 0 else "zoom"
                data = encode_clip(_moving_frames(images[number], frames, size, motion), codec, rate)
                folder = (f"{split}/class_{label}" if layout == "folders" else f"clips/class_{label}")
                name = f"{folder}/{split}_{number:03d}.mp4"
                (root / folder).mkdir(parents=True, exist_ok=True, mode=folder_mode())
                write_file(root / name, data)
                lines[split].append(f"{name} {label}")
    if layout == "lists":
        for split, listed in lines.items():
            write_file(root / f"{split}.txt", "\n".join(listed) + "\n")
    return root


def encode_clip(frames: np.ndarray, codec: str = "mpeg4", rate: int = 8) -> bytes:
    """An MP4 file holding ``frames``, (T, H, W, 3) uint8 RGB, encoded as yuv420p."""
    av = need_av()
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # the frames the encoder still holds
            container.mux(packet)
    return buffer.getvalue()


def _moving_frames(image_path: Path, frames: int, size: int, motion: str) -> np.ndarray:
    """(frames, size, size, 3) uint8: a window panning across, or zooming into, one image."""
    with Image.open(image_path) as opened:
        image = opened.convert("RGB")
    if motion == "pan":  # the short side scaled to 1.5 x the window, which slides along the width
        side = size * 3 // 2
        scale = side / min(image.size)
        wide = image.resize((max(round(image.width * scale), side), max(round(image.height * scale), side)),
                            Image.Resampling.BICUBIC)
        top = (wide.height - size) // 2
        lefts = np.linspace(0, wide.width - size, frames).round().astype(int)
        crops = [wide.crop((left, top, left + size, top + size)) for left in lefts]
    else:  # the window shrinks from the whole image to its centre half
        width, height = image.size
        crops = []
        for share in np.linspace(1.0, 0.5, frames):
            half_w, half_h = width * share / 2, height * share / 2
            box = (width / 2 - half_w, height / 2 - half_h, width / 2 + half_w, height / 2 + half_h)
            crops.append(image.resize((size, size), Image.Resampling.BICUBIC, box=box))
    return np.stack([np.asarray(crop, dtype=np.uint8) for crop in crops])

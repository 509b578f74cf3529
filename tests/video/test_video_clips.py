"""Reading clips: the frames come back as encoded, and every broken or hostile file gives one
TietaError sentence naming it (never a traceback, never a hang)."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tieta import TietaError
from tieta.data.vtab import open_task
from tieta.video.clips import clip_path, read_clip
from tieta.video.testdata import _moving_frames, encode_clip
from tests.video.clipdata import FRAMES, SIZE, SOURCE, clip_folders  # noqa: F401  (a fixture)

av = pytest.importorskip("av")


def a_clip(task: Path) -> Path:
    return sorted((task / "train" / "class_0").iterdir())[0]


def test_a_clip_decodes_to_its_frames(clip_folders, tmp_path):
    clip = read_clip(a_clip(clip_folders))
    assert clip.count == FRAMES
    frames = clip.rgb([0, 5, 5, 15])
    assert frames.shape == (4, 3, SIZE, SIZE) and frames.dtype == torch.uint8
    assert torch.equal(frames[1], frames[2])
    # the pan it was made from, within what MPEG-4 at its default bit rate keeps
    image = next(path for path, label in open_task(SOURCE).split("train") if label == 0)
    made = torch.from_numpy(_moving_frames(image, FRAMES, SIZE, "pan")).permute(0, 3, 1, 2)
    assert (clip.rgb(list(range(FRAMES))).float() - made.float()).abs().mean() < 12


def test_frames_are_in_presentation_order(tmp_path):
    levels = np.arange(0, 240, 30, dtype=np.uint8)  # 8 frames, each one grey level
    path = tmp_path / "grey.mp4"
    path.write_bytes(encode_clip(np.broadcast_to(levels[:, None, None, None], (8, 32, 32, 3)).copy()))
    means = read_clip(path).rgb(list(range(8))).float().mean(dim=(1, 2, 3))
    assert torch.allclose(means, torch.tensor(levels, dtype=torch.float32), atol=4)


def broken(tmp_path: Path, clip: Path, kind: str) -> Path:
    data = clip.read_bytes()
    path = tmp_path / f"{kind}.mp4"
    if kind == "truncated":  # cut before its index (moov), which PyAV writes last
        path.write_bytes(data[:len(data) * 2 // 3])
    elif kind == "corrupt":  # every byte of the frames (mdat, between its header and the index) noise
        start, end = data.find(b"mdat") + 4, data.find(b"moov") - 4
        noise = np.random.RandomState(0).randint(0, 256, end - start, dtype=np.uint8).tobytes()
        path.write_bytes(data[:start] + noise + data[end:])
    elif kind == "text":
        path.write_text("this is not a video\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "index":  # the index (moov) overwritten: no stream left to decode
        start = data.find(b"moov") + 8
        path.write_bytes(data[:start] + bytes(200) + data[start + 200:])
    return path


@pytest.mark.parametrize("kind,message", [
    ("truncated", "it is corrupt, truncated or not a video"),
    ("corrupt", "it is corrupt, truncated or not a video"),
    ("text", "it is corrupt, truncated or not a video"),
    ("empty", "it is corrupt, truncated or not a video"),
    ("index", "has no video stream"),
])
def test_a_broken_clip_is_named_in_one_sentence(clip_folders, tmp_path, kind, message):
    path = broken(tmp_path, a_clip(clip_folders), kind)
    with pytest.raises(TietaError, match=message) as caught:
        read_clip(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_clip_cut_short_after_its_index_is_truncated(tmp_path):
    """With its index first (faststart), a cut clip still opens: fewer frames decode than it lists."""
    path = tmp_path / "whole.mp4"
    frames = np.random.RandomState(0).randint(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    assert read_clip(path).count == 16
    with pytest.raises(TietaError, match=r"cut.mp4 is truncated: its header lists 16 frames, the file holds [0-9]+$"):
        read_clip(cut)


def test_an_audio_file_has_no_video_stream(tmp_path):
    path = tmp_path / "sound.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(TietaError, match="sound.mp4 has no video stream"):
        read_clip(path)


def test_frames_times_pixels_are_limited(clip_folders):
    clip = a_clip(clip_folders)
    assert read_clip(clip, max_pixels=FRAMES * SIZE * SIZE).count == FRAMES
    with pytest.raises(TietaError, match=r"too large to decode: its header lists 16 frames of 64 x 64 pixels, more "
                                         r"than the limit of 65,535 frames x pixels \(video.max_pixels\)"):
        read_clip(clip, max_pixels=FRAMES * SIZE * SIZE - 1)


def test_the_limit_counts_decoded_frames_where_the_header_lists_none(tmp_path, monkeypatch):
    """A container may list no frame count (WebM, a stream): the frames decoded count instead."""
    path = tmp_path / "clip.mkv"
    frames = np.zeros((12, 32, 32, 3), dtype=np.uint8)
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert read_clip(path).count == 12
    with pytest.raises(TietaError, match="it has at least 11 frames of 32 x 32 pixels"):
        read_clip(path, max_pixels=10 * 32 * 32)


def test_not_a_regular_file(tmp_path):
    (tmp_path / "folder.mp4").mkdir()
    os.mkfifo(tmp_path / "pipe.mp4")  # av.open would wait on it for ever
    for name in ("folder.mp4", "pipe.mp4"):
        with pytest.raises(TietaError, match=f"clip {tmp_path / name} is not a regular file"):
            read_clip(tmp_path / name)
    with pytest.raises(TietaError, match="cannot read clip .*gone.mp4: No such file or directory"):
        read_clip(tmp_path / "gone.mp4")


def test_paths_stay_inside_the_task(tmp_path):
    root = tmp_path / "task"
    (root / "clips").mkdir(parents=True)
    (tmp_path / "outside.mp4").write_bytes(b"")
    (root / "clips" / "link.mp4").symlink_to(tmp_path / "outside.mp4")
    (root / "clips" / "inner.mp4").write_bytes(b"")
    (root / "clips" / "near.mp4").symlink_to(root / "clips" / "inner.mp4")  # a link inside the task is fine
    assert clip_path(root, "clips/near.mp4", "train.txt:1") == root / "clips" / "near.mp4"
    for name, reason in [("../outside.mp4", "leaves the task folder"), (str(tmp_path / "outside.mp4"),
                         "leaves the task folder"), ("clips/../../outside.mp4", "leaves the task folder"),
                         ("clips/link.mp4", "leads out of the task folder through a symbolic link")]:
        with pytest.raises(TietaError, match=f"train.txt:1: clip path .* {reason}"):
            clip_path(root, name, "train.txt:1")


def test_without_pyav_the_extra_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(TietaError, match=r"pip install 'tieta\[video\]'"):
        read_clip(tmp_path / "any.mp4")


def test_a_loop_of_links_is_named(tmp_path):
    (tmp_path / "a.mp4").symlink_to(tmp_path / "b.mp4")
    (tmp_path / "b.mp4").symlink_to(tmp_path / "a.mp4")
    with pytest.raises(TietaError, match="train.txt:2: clip path a.mp4 cannot be followed"):
        clip_path(tmp_path, "a.mp4", "train.txt:2")

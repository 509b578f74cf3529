"""Video task folders: detection, both layouts, their hostile lists and folders, the settings'
checks, and the (clip, label) items a run trains and is evaluated on."""

import shutil

import pytest
import torch
from torch.utils.data import DataLoader

from tieta import TietaError
from tieta.data.vtab import fingerprint
from tieta.video.dataset import VideoDataConfig, VideoDataset, is_video_task, open_video_task
from tieta.video.testdata import make_clip_task
from tests.video.clipdata import SOURCE, clip_folders, clip_lists  # noqa: F401  (fixtures)


def test_a_clip_task_is_detected(clip_folders, clip_lists, tmp_path):
    assert is_video_task(clip_folders) and is_video_task(clip_lists)
    assert not is_video_task(SOURCE)  # an image task
    (tmp_path / "images" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "images" / "train" / "cat" / "a.jpg").write_bytes(b"")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("a.jpg 0\n")
    (tmp_path / "file.mp4").write_bytes(b"")
    for path in ("images", "lists", "file.mp4", "missing", ""):
        assert not is_video_task(tmp_path / path)


@pytest.mark.parametrize("layout", ["clip_folders", "clip_lists"])
def test_both_layouts_open_to_the_same_task(layout, request):
    task = open_video_task(request.getfixturevalue(layout))
    assert task.layout == "video" and task.num_classes == 2
    assert task.class_names == (["class_0", "class_1"] if layout == "clip_folders" else None)
    for split in ("train", "test"):
        pairs = task.split(split)
        assert [label for _, label in pairs] == [0, 0, 0, 1, 1, 1]
        assert all(path.is_file() and path.suffix == ".mp4" for path, _ in pairs)
    assert fingerprint(task, ("train", "test")).startswith("2 classes, 12 images")


def test_a_list_names_clips_inside_the_task_with_integer_labels(clip_lists, tmp_path):
    root = tmp_path / "task"
    shutil.copytree(clip_lists, root)
    outside = tmp_path / "outside.mp4"
    shutil.copy(root / "clips" / "class_0" / "train_000.mp4", outside)
    (root / "clips" / "link.mp4").symlink_to(outside)
    good = (root / "train.txt").read_text()
    cases = [
        ("../outside.mp4 0", "train.txt:7: clip path ../outside.mp4 leaves the task folder"),
        (f"{outside} 0", f"train.txt:7: clip path {outside} leaves the task folder"),
        ("clips/link.mp4 0", "train.txt:7: clip path clips/link.mp4 leads out of the task folder through a "
                             "symbolic link"),
        ("clips/class_0/notes.txt 0", "train.txt:7: clips/class_0/notes.txt is not a clip"),
        ("clips/class_0/train_000.mp4 -1", "train.txt:7: expected '<clip path> <label>' with a label of 0"),
        ("clips/class_0/train_000.mp4", "train.txt:7: expected '<clip path> <label>'"),
        ("clips/class_0/train_000.mp4 3", "has labels up to 3 but no clip of class 2"),
    ]
    for line, message in cases:
        (root / "train.txt").write_text(good + line + "\n")
        with pytest.raises(TietaError, match=message.replace("(", r"\(").replace(")", r"\)")):
            open_video_task(root)
    (root / "train.txt").write_text(good)
    (root / "test.txt").write_text("clips/class_0/train_000.mp4 2\n")
    with pytest.raises(TietaError, match="test.txt: label 2 of .* is not a training class"):
        open_video_task(root)
    (root / "test.txt").write_text("\n")
    with pytest.raises(TietaError, match="list file .*test.txt names no clips"):
        open_video_task(root)
    (root / "test.txt").write_bytes(b"clips/class_0/\xff.mp4 0\n")
    with pytest.raises(TietaError, match=r"test.txt:1: not UTF-8 text \(byte 0xff"):
        open_video_task(root)


def test_a_class_folder_may_not_link_out_of_the_task(clip_folders, tmp_path):
    root = tmp_path / "task"
    shutil.copytree(clip_folders, root)
    (root / "train" / "class_0" / "away.mp4").symlink_to(tmp_path)
    with pytest.raises(TietaError, match="away.mp4 leads out of the task folder through a symbolic link"):
        open_video_task(root)
    (root / "train" / "class_0" / "away.mp4").unlink()
    (root / "test" / "class_9").mkdir()
    with pytest.raises(TietaError, match="class folder .*class_9 is not among the training classes"):
        open_video_task(root)


def test_a_folder_without_clips_is_no_video_task(tmp_path):
    with pytest.raises(TietaError, match="is not a video task folder"):
        open_video_task(tmp_path)
    with pytest.raises(TietaError, match="does not exist"):
        open_video_task(tmp_path / "missing")
    (tmp_path / "train" / "empty").mkdir(parents=True)
    with pytest.raises(TietaError, match="class folder .*empty has no clips"):
        open_video_task(tmp_path)


def test_the_settings_are_checked_in_one_sentence():
    assert VideoDataConfig().views == 3 and VideoDataConfig.preset("ssv2").views == 3
    ssv2 = VideoDataConfig.preset("ssv2")
    assert (ssv2.style, ssv2.frames, ssv2.sampling_rate, ssv2.temporal_views, ssv2.spatial_views) == \
        ("ssv2", 8, 0, 1, 3)
    k400 = VideoDataConfig.preset("k400")
    assert (k400.style, k400.frames, k400.sampling_rate, k400.temporal_views, k400.spatial_views) == \
        ("k400", 8, 16, 3, 1)
    for config in (k400, ssv2):
        config.check()
    cases = [
        (dict(style="ucf"), "video.style must be one of k400, ssv2"),
        (dict(frames=0), "video.frames must be between 1 and 256"),
        (dict(sampling_rate=-1), "video.sampling_rate must be at least 0"),
        (dict(temporal_views=0), "video.temporal_views must be at least 1"),
        (dict(sampling_rate=0), "video.temporal_views must be 1 with video.sampling_rate 0"),
        (dict(spatial_views=2), "video.spatial_views must be 1 or 3"),
        (dict(max_pixels=0), "video.max_pixels must be at least 1"),
    ]
    for settings, message in cases:
        with pytest.raises(TietaError, match=message):
            VideoDataConfig(**settings).check()
    with pytest.raises(TietaError, match="data.video.frames"):
        VideoDataConfig(frames=0).check(prefix="data.video.")
    with pytest.raises(TietaError, match="video style must be one of k400, ssv2"):
        VideoDataConfig.preset("ucf")


@pytest.mark.parametrize("style", ["k400", "ssv2"])
def test_training_and_evaluation_items(clip_folders, style):
    task = open_video_task(clip_folders)
    config = VideoDataConfig.preset(style)
    config.sampling_rate = 2 if style == "k400" else 0  # 8 frames at a stride of 2 fit the 16-frame clips
    train = VideoDataset(task.split("train"), task.num_classes, config, 32, training=True)
    assert len(train) == 6 and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    torch.manual_seed(0)
    clips, labels = next(iter(DataLoader(train, batch_size=4, shuffle=False)))
    assert clips.shape == (4, 8, 3, 32, 32) and clips.dtype == torch.float32 and labels.tolist() == [0, 0, 0, 1]
    torch.manual_seed(0)
    assert torch.equal(clips, next(iter(DataLoader(train, batch_size=4, shuffle=False)))[0])  # torch's seed decides
    assert not torch.equal(train[0][0], train[0][0])  # and every read draws anew
    test = VideoDataset(task.split("test"), task.num_classes, config, 32, training=False)
    views, label = test[3]
    assert views.shape == (3, 8, 3, 32, 32) and label == 1
    assert torch.equal(views, test[3][0])  # evaluation is the same every time
    assert 0 <= float(views.mean()) <= 255


def test_items_are_checked_before_any_clip_is_read(clip_folders, tmp_path):
    task = open_video_task(clip_folders)
    config = VideoDataConfig()
    with pytest.raises(TietaError, match="label 1 of .* is out of range for a model with 1 classes"):
        VideoDataset(task.split("train"), 1, config, 32, training=True)
    with pytest.raises(TietaError, match="clip .*gone.mp4 does not exist"):
        VideoDataset([(tmp_path / "gone.mp4", 0)], 2, config, 32, training=True)
    with pytest.raises(TietaError, match="video.frames must be between"):
        VideoDataset(task.split("train"), 2, VideoDataConfig(frames=0), 32, training=True)


def test_a_clip_over_the_limit_is_refused_when_read(clip_folders):
    task = open_video_task(clip_folders)
    dataset = VideoDataset(task.split("test"), 2, VideoDataConfig(max_pixels=1000), 32, training=False)
    with pytest.raises(TietaError, match="too large to decode"):
        dataset[0]


def test_a_clip_task_is_written_to_a_new_folder_only(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    with pytest.raises(TietaError, match="already exists and is not an empty folder"):
        make_clip_task(tmp_path / "taken", SOURCE)
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"
    with pytest.raises(TietaError, match="fewer than the 500 clips asked for"):
        make_clip_task(tmp_path / "big", SOURCE, clips_per_class=500)


def test_views_are_scored_by_their_mean_logits():
    from tieta.video.views import mean_over_views
    views = torch.arange(2 * 3, dtype=torch.float32).view(2, 3, 1, 1, 1, 1).expand(2, 3, 8, 3, 4, 4)

    def model(clips):  # (N, T, 3, S, S) -> (N, 2): each clip's mean, and its negation
        means = clips.mean(dim=(1, 2, 3, 4))
        return torch.stack([means, -means], dim=1)

    logits = mean_over_views(model, views)
    assert torch.equal(logits, torch.tensor([[1.0, -1.0], [4.0, -4.0]]))


def test_val_txt_is_the_test_split_where_there_is_no_test_txt(clip_lists, tmp_path):
    root = tmp_path / "task"
    shutil.copytree(clip_lists, root)
    (root / "test.txt").rename(root / "val.txt")
    task = open_video_task(root)
    assert task.split("test") == task.split("val") and len(task.split("test")) == 6


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".avi", ".mkv", ".MP4"])
def test_every_clip_suffix_is_detected(tmp_path, suffix):
    (tmp_path / "train" / "walking").mkdir(parents=True)
    (tmp_path / "train" / "walking" / f"a{suffix}").write_bytes(b"")
    assert is_video_task(tmp_path)

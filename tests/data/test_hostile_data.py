"""Hostile and malformed task folders, made at test time: each must give one TietaError sentence
(naming the file, and the line where there is one), never a traceback, a warning or a wrong result."""

import importlib
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from tests.conftest import write_vtab_task
from tieta import TietaError
from tieta.data.transforms import MAX_IMAGE_PIXELS, load_resized
from tieta.data.vtab import ImageDataset, open_task


def png_bytes(width: int, height: int, bit_depth: int = 8, color_type: int = 2, rows: bytes = b"",
              transparency: bytes = b"") -> bytes:
    """A PNG written by hand, so a header can claim any size while the file stays tiny.

    Args:
        rows: the filtered scanlines (a 0 filter byte, then the row's big-endian samples).
        transparency: a tRNS chunk's data, if any.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
    key = chunk(b"tRNS", transparency) if transparency else b""
    return b"\x89PNG\r\n\x1a\n" + header + key + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.fixture
def task10(tmp_path) -> Path:
    """A VTAB task with classes 0-9, one training and one test image each (line i+1 has label i)."""
    return write_vtab_task(tmp_path / "task", num_classes=10, per_class=1, test_per_class=1, size=8)


def append(file: Path, line: str) -> None:
    file.write_text(file.read_text() + line + "\n")


# 1. labels must be the task's classes


def test_stray_test_label_is_refused_not_a_100_class_head(task10):
    append(task10 / "test.txt", "images/test/000000.jpg 99")
    with pytest.raises(TietaError, match=r"test\.txt:11: label 99 is not a training class "
                                         r"\(train800val200\.txt has classes 0-9\)"):
        open_task(task10)


def test_stray_training_label_is_refused_as_a_likely_typo(task10):
    append(task10 / "train800val200.txt", "images/train/000000.jpg 99")
    with pytest.raises(TietaError, match=r"classes 10-98 have no image in any list file: "
                                         r"is label 99 in .*train800val200\.txt:11 a typo\?"):
        open_task(task10)


def test_test_label_one_past_the_training_classes_is_refused(task10):
    (task10 / "train800val200.txt").unlink()  # the training lists are then train800 + val200
    append(task10 / "test.txt", "images/test/000000.jpg 10")
    with pytest.raises(TietaError, match=r"label 10 is not a training class \(train800\.txt and val200\.txt "
                                         r"have classes 0-9\)"):
        open_task(task10)


def test_labels_must_start_at_zero(task10):
    for name in ("train800val200.txt", "train800.txt", "val200.txt", "test.txt"):
        lines = (task10 / name).read_text().splitlines()
        (task10 / name).write_text("".join(f"{line.split()[0]} {int(line.split()[1]) + 1}\n" for line in lines))
    with pytest.raises(TietaError, match="no list file has label 0 .*number the classes from 0"):
        open_task(task10)


def test_test_only_classes_are_kept_where_the_training_lists_skip_classes(task10):
    # the public sun397: 1,000 training images miss some of its 397 classes, which test.txt has
    for name in ("train800val200.txt", "train800.txt"):
        lines = (task10 / name).read_text().splitlines()
        (task10 / name).write_text("".join(line + "\n" for line in lines if not line.endswith(" 5")))
    task = open_task(task10)
    assert task.num_classes == 10 and 5 not in {label for _, label in task.split("train")}


# 2. pixels decoded faithfully, or refused


def test_rgb_and_grey_images_decode_exactly_as_before(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (23, 31, 3), dtype=np.uint8)
    for name, image in (("rgb.jpg", Image.fromarray(pixels)), ("rgb.png", Image.fromarray(pixels)),
                        ("grey.png", Image.fromarray(pixels[..., 0])), ("grey.jpg", Image.fromarray(pixels[..., 1]))):
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as opened:
            old = opened.convert("RGB").resize((16, 16), Image.Resampling.BICUBIC)
        assert torch.equal(load_resized(tmp_path / name, 16), torch.from_numpy(np.asarray(old).copy()).permute(2, 0, 1))


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_grey_is_scaled_not_white(tmp_path, mode):
    values = np.array([[0, 18 * 257, 0x1234, 0x8000, 65535]], dtype=np.uint16)
    Image.frombytes(mode, (5, 1), values.astype("<u2" if mode == "I;16" else ">u2").tobytes()).save(tmp_path / "g.tif")
    assert Image.open(tmp_path / "g.tif").mode == mode
    image = load_resized(tmp_path / "g.tif", 5)[:, 0, :]  # same size: PIL copies, no resampling
    assert image[0].tolist() == [0, 18, 18, 128, 255]  # round(value / 257)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])


def test_32_bit_integer_images_are_16_bit_data_or_refused(tmp_path):
    Image.fromarray(np.array([[0, 257, 65535]], dtype=np.int32)).save(tmp_path / "ok.tif")
    assert load_resized(tmp_path / "ok.tif", 3)[0, 0].tolist() == [0, 1, 255]
    for name, values in (("big.tif", [0, 70000]), ("negative.tif", [-1, 5])):
        Image.fromarray(np.array([values], dtype=np.int32)).save(tmp_path / name)
        with pytest.raises(TietaError, match=f"{name} has 32-bit integer pixels outside 0-65535"):
            load_resized(tmp_path / name, 2)


def test_float_images_are_refused(tmp_path):
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(TietaError, match="f.tif has 32-bit float pixels, which have no standard range"):
        load_resized(tmp_path / "f.tif", 4)


def test_transparency_is_composited_over_black(tmp_path):
    Image.new("RGBA", (2, 2), (200, 100, 50, 128)).save(tmp_path / "rgba.png")
    Image.new("LA", (2, 2), (200, 0)).save(tmp_path / "la.png")
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "key.gif", transparency=1)  # pixel 1 fully transparent
    palette.save(tmp_path / "alpha.png", transparency=bytes([255, 100]))  # palette with partial alpha
    palette.save(tmp_path / "plain.png")
    grey16 = np.array([1000, 65535, 30000], dtype=">u2").tobytes()  # 65535 is the transparent value
    (tmp_path / "key16.png").write_bytes(png_bytes(3, 1, 16, 0, b"\x00" + grey16, struct.pack(">H", 65535)))
    assert load_resized(tmp_path / "rgba.png", 2)[:, 0, 0].tolist() == [100, 50, 25]
    assert load_resized(tmp_path / "la.png", 2).max() == 0
    assert load_resized(tmp_path / "key.gif", 2)[:, 0].T.tolist() == [[255, 0, 0], [0, 0, 0]]
    assert load_resized(tmp_path / "alpha.png", 2)[:, 0].T.tolist() == [[255, 0, 0], [0, 100, 0]]
    assert load_resized(tmp_path / "plain.png", 2)[:, 0].T.tolist() == [[255, 0, 0], [0, 255, 0]]
    assert load_resized(tmp_path / "key16.png", 3)[0, 0].tolist() == [4, 0, 117]


def test_other_convertible_modes_use_pils_conversion(tmp_path):
    Image.new("CMYK", (4, 4), (10, 200, 30, 40)).save(tmp_path / "cmyk.jpg")
    Image.new("1", (4, 4), 1).save(tmp_path / "one.png")
    for name in ("cmyk.jpg", "one.png"):
        with Image.open(tmp_path / name) as image:
            expected = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
        assert torch.equal(load_resized(tmp_path / name, 4), expected)


def test_unknown_pixel_types_are_refused(tmp_path, monkeypatch):
    image = Image.new("La", (2, 2))  # premultiplied grey+alpha: PIL cannot convert it to RGB
    monkeypatch.setattr(Image, "open", lambda path: image)  # no file format gives this mode
    with pytest.raises(TietaError, match="odd.png has the pixel type 'La', which tieta does not decode"):
        load_resized(tmp_path / "odd.png", 2)


# 3. oversized images refused on the header, before any pixel is read


def test_limit_is_64_megapixels():
    assert MAX_IMAGE_PIXELS == 64 * 2**20


@pytest.mark.parametrize("side", [8193, 10_000, 100_000])  # just over ours; over PIL's warning; a bomb
def test_oversized_headers_are_refused_silently(tmp_path, side):
    path = tmp_path / "huge.png"
    path.write_bytes(png_bytes(side, side))  # the header claims side x side; no pixel data follows
    assert path.stat().st_size < 200
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning (or any other) would fail the test
        with pytest.raises(TietaError, match=r"huge\.png (is \d+ x \d+ pixels, outside|has more than) .*pixels"):
            load_resized(path, 16)


# 4. truncated and corrupt files


@pytest.mark.parametrize("name", ["cut.jpg", "cut.png"])
def test_truncated_images_are_refused(tmp_path, name):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / name)
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(TietaError, match=f"cannot read image .*{name}: it is corrupt or truncated"):
        load_resized(tmp_path / name, 16)


def test_random_bytes_are_refused(tmp_path):
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(TietaError, match=r"cannot read image .*noise\.jpg: it is not an image file PIL knows"):
        ImageDataset([(tmp_path / "noise.jpg", 0)], 16, 1)


def test_truncated_images_are_never_loaded_silently():
    import tieta

    for module in ("tieta.data.assets", "tieta.data.vtab", "tieta.data.transforms"):
        importlib.import_module(module)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    sources = Path(tieta.__file__).parent.rglob("*.py")  # modules imported lazily by the commands too
    assert not [path for path in sources if "LOAD_TRUNCATED_IMAGES" in path.read_text()]


# 5. list files


@pytest.mark.parametrize("line,message", [
    ("images/train/000000.jpg", "expected '<image path> <integer label>'"),
    ("images/train/000000.jpg 1 2", "expected '<image path> <integer label>'"),
    ("images/train/000000.jpg cat", "expected '<image path> <integer label>'"),
    ("images/train/000000.jpg 1.0", "expected '<image path> <integer label>'"),
    ("images/train/000000.jpg \u00b2", "expected '<image path> <integer label>'"),  # isdigit() but not int()
    ("images/train/000000.jpg --5", "expected '<image path> <integer label>'"),
    ("images/train/000000.jpg " + "9" * 5000, "expected '<image path> <integer label>', got '.{70,80}'$"),
    ("images/train/000000.jpg -1", "label -1 is negative"),
    ("../x.jpg 0", "image path ../x.jpg leaves the task folder"),
    ("images/../../x.jpg 0", "image path images/../../x.jpg leaves the task folder"),
    ("/etc/x.jpg 0", "image path /etc/x.jpg leaves the task folder"),
    ("images/a\x00.jpg 0", r"image path .images/a.*\.jpg. has an unprintable character"),
])
def test_malformed_list_lines_name_file_and_line(task10, line, message):
    append(task10 / "test.txt", line)
    with pytest.raises(TietaError, match=r"test\.txt:11: " + message):
        open_task(task10)


def test_non_utf8_list_file(task10):
    (task10 / "test.txt").write_bytes(b"images/test/000000.jpg 0\nimages/test/caf\xe9.jpg 1\n")
    with pytest.raises(TietaError, match=r"test\.txt:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        open_task(task10)


def test_utf8_bom_and_crlf_are_read(task10):
    text = (task10 / "test.txt").read_text()
    (task10 / "test.txt").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    assert open_task(task10).split("test")[0][0] == task10 / "images/test/000000.jpg"


def test_list_file_that_is_a_folder(task10):
    (task10 / "test.txt").unlink()
    (task10 / "test.txt").mkdir()
    with pytest.raises(TietaError, match=r"list file .*test\.txt is not a regular file"):
        open_task(task10)


def test_unreadable_list_file(task10, monkeypatch):
    if os.geteuid() != 0:
        (task10 / "test.txt").chmod(0)
    else:  # root reads anything, so fake the refusal
        read_bytes = Path.read_bytes

        def denied(self: Path) -> bytes:
            if self.name == "test.txt":
                raise PermissionError(13, "Permission denied")
            return read_bytes(self)

        monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(TietaError, match=r"cannot read list file .*test\.txt: Permission denied"):
        open_task(task10)


# 6. ImageFolder layout


def image_folder(root: Path, layout: dict[str, list[str]]) -> Path:
    for split, classes in layout.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / name / "a.png")
    return root


def test_empty_training_class_folder(tmp_path):
    image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat"]})
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(TietaError, match=r"class folder .*train/empty has no images \(\.bmp"):
        open_task(tmp_path)


def test_test_class_that_is_not_a_training_class(tmp_path):
    image_folder(tmp_path, {"train": ["cat", "dog"], "test": ["cat", "cow"]})
    with pytest.raises(TietaError, match=r"class folder .*test/cow is not among the training classes"):
        open_task(tmp_path).split("test")


def test_hidden_folders_are_not_classes(tmp_path):
    image_folder(tmp_path, {"train": ["cat", "dog"], "test": ["cat"]})
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "test" / ".ipynb_checkpoints").mkdir()
    task = open_task(tmp_path)
    assert task.class_names == ["cat", "dog"] and len(task.split("test")) == 1


# 7. empty splits and missing images


def test_empty_splits_are_refused(task10, tmp_path):
    (task10 / "test.txt").write_text("\n  \n")
    with pytest.raises(TietaError, match=r"the 'test' split of .*test\.txt has no images"):
        open_task(task10).split("test")
    folder = image_folder(tmp_path / "folder", {"train": ["cat"]})
    (folder / "test" / "cat").mkdir(parents=True)
    with pytest.raises(TietaError, match="the 'test' split of .*folder has no images"):
        open_task(folder).split("test")


def test_missing_image_and_folder_named_like_an_image(task10):
    items = open_task(task10).split("test")
    (items[0][0]).unlink()
    with pytest.raises(TietaError, match=r"image .*000000\.jpg does not exist"):
        ImageDataset(items, 8, 10)
    (items[0][0]).mkdir()
    with pytest.raises(TietaError, match=r"image .*000000\.jpg is not a file"):
        ImageDataset(items, 8, 10)
    with pytest.raises(TietaError, match="label -1 of .* is out of range"):
        ImageDataset([(items[1][0], -1)], 8, 10)

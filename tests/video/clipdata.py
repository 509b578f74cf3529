"""Video tasks for the tests in tests/video/, made once per session from vtab-mini's dtd10 images
(tieta.video.testdata.make_clip_task): 2 classes x 3 training and 3 test clips of 16 frames, 64 x 64."""

from pathlib import Path

import pytest

from tests.conftest import VTAB_MINI

pytest.importorskip("av")

SOURCE = VTAB_MINI / "dtd10"
FRAMES, SIZE = 16, 64


def _make(factory, layout: str) -> Path:
    from tieta.video.testdata import make_clip_task
    if not SOURCE.is_dir():
        pytest.skip(f"vtab-mini data not found at {VTAB_MINI} (set TIETA_VTAB_MINI)")
    return make_clip_task(factory.mktemp("clips") / layout, SOURCE, frames=FRAMES, size=SIZE, layout=layout)


@pytest.fixture(scope="session")
def clip_folders(tmp_path_factory) -> Path:
    """A task of train/<class>/*.mp4 and test/<class>/*.mp4 folders."""
    return _make(tmp_path_factory, "folders")


@pytest.fixture(scope="session")
def clip_lists(tmp_path_factory) -> Path:
    """A task of clips/<class>/*.mp4 named by train.txt and test.txt."""
    return _make(tmp_path_factory, "lists")

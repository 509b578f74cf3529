"""torch Datasets given to fit directly: (PIL image or (3, H, W) tensor, int label) items."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from tieta import TietaError
from tieta.data.given import GivenImages, count_classes
from tieta.train.config import load_config
from tieta.train.fit import evaluate_checkpoint, fit

TINY = {"model": "test_vit", "weights": "random", "img_size": 32, "optim.epochs": 1, "optim.batch_size": 4,
        "eval_batch_size": 8, "lora.rank": 2}


pytestmark = pytest.mark.usefixtures("quick_throughput")  # the runs here check the data path, not the speed


class Colours(Dataset):
    """Images whose colour says their class, as PIL images, uint8 tensors or 0-1 float tensors."""

    def __init__(self, kind: str, per_class: int = 3, classes: int = 3, seed: int = 0) -> None:
        self.kind, self.items = kind, []
        rng = np.random.default_rng(seed)
        for label in range(classes):
            for _ in range(per_class):
                pixels = rng.integers(0, 60, size=(14, 10, 3), dtype=np.uint8)
                pixels[..., label % 3] += 150
                self.items.append((pixels, label))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        pixels, label = self.items[index]
        if self.kind == "pil":
            return Image.fromarray(pixels), label
        tensor = torch.from_numpy(pixels).permute(2, 0, 1)
        return (tensor if self.kind == "uint8" else tensor / 255.0), torch.tensor(label)


def test_pil_and_tensor_images_read_alike():
    pil, uint8, floats = (GivenImages(Colours(kind), "train", 16, 3) for kind in ("pil", "uint8", "float"))
    assert pil.images.shape == (9, 3, 16, 16) and pil.images.dtype == torch.uint8
    assert torch.equal(pil.images, uint8.images) and torch.equal(pil.images, floats.images)
    assert pil.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_normalised_tensors_are_refused():
    class Normalised(Colours):
        def __getitem__(self, index):
            image, label = super().__getitem__(index)
            return (image - 0.5) / 0.25, label

    with pytest.raises(TietaError, match=r"item 0 of the train dataset has float pixels outside \[0, 1\]"):
        GivenImages(Normalised("float"), "train", 16, 3)


def test_labels_are_checked():
    with pytest.raises(TietaError, match="item 6 of the test dataset has the label 2, out of range for a model "
                                         "with 2 classes"):
        GivenImages(Colours("pil"), "test", 16, 2)


def test_number_of_classes():
    data = Colours("pil")
    assert count_classes(data, None) == 3 and count_classes(data, 5) == 5
    data.classes = ["a", "b", "c", "d"]
    assert count_classes(data, None) == 4


def test_fit_needs_both_datasets_and_no_folder(vtab_task, tmp_path):
    with pytest.raises(TietaError, match="given a train dataset but no test one"):
        fit(load_config(overrides=TINY), tmp_path / "run", train=Colours("pil"))
    with pytest.raises(TietaError, match="given datasets and data.path"):
        fit(load_config(overrides={**TINY, "data.path": str(vtab_task)}), tmp_path / "run", train=Colours("pil"),
            test=Colours("pil"))
    assert not (tmp_path / "run").exists()


def test_resume_with_given_datasets_needs_the_same_data(tmp_path):
    from conftest import fail_in_epoch

    """A real run on given datasets (PIL images to train, uint8 tensors to test, augmented), stopped
    after its first epoch and resumed."""
    config = load_config(overrides={**TINY, "optim.epochs": 2, "data.augment": "timm"})
    with pytest.MonkeyPatch.context() as patch:
        fail_in_epoch(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            fit(config, tmp_path / "run", train=Colours("pil"), test=Colours("uint8", per_class=2, seed=1))
    assert "path: null" in (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(TietaError, match="the datasets given changed since the run"):
        fit(config, tmp_path / "run", resume=True, train=Colours("pil", seed=2),
            test=Colours("uint8", per_class=2, seed=1))
    summary = fit(config, tmp_path / "run", resume=True, train=Colours("pil"),
                  test=Colours("uint8", per_class=2, seed=1))
    assert summary["num_classes"] == 3 and summary["data"] == "torch datasets"
    assert summary["data_fingerprint"].startswith("3 classes, 15 images")
    with pytest.raises(TietaError, match="trained on datasets given to fit in Python: give the data"):
        evaluate_checkpoint(tmp_path / "run")

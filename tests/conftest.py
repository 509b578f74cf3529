"""Shared fixtures: small random timm ViT variants and task folders made on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5, qkv_bias=True)

# name -> builder of a small, random ViT of that family (the variants tieta must support)
VIT_VARIANTS = {
    "plain": lambda: VisionTransformer(**SMALL),
    "layerscale": lambda: VisionTransformer(**SMALL, init_values=0.3),
    "qk_norm": lambda: VisionTransformer(**SMALL, qk_norm=True),
    "registers": lambda: VisionTransformer(**SMALL, reg_tokens=4, no_embed_class=True, init_values=0.3),
    "distilled": lambda: VisionTransformerDistilled(**SMALL),
    "avg_pool": lambda: VisionTransformer(**SMALL, class_token=False, global_pool="avg", fc_norm=True),
}

# name -> builder of a small, random timm Eva (tests/test_eva.py runs the ViT parity tests on them):
# EVA-02 (fused qkv with q/v biases, SwiGLU, rope, average pool) and a rope ViT (AttentionRope,
# LayerScale, class-token head, no absolute position embedding)
EVA_VARIANTS = {
    "eva02": lambda: _eva("eva02_tiny_patch14_224"),
    "rope_vit": lambda: _eva("vit_small_patch16_rope_224"),
}


def _eva(name: str, **kwargs):
    """A small random timm Eva with SMALL's shape."""
    import timm

    shape = {key: SMALL[key] for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes")}
    return timm.create_model(name, pretrained=False, **shape, **kwargs)


def make_vit(variant: str, seed: int = 0) -> VisionTransformer:
    """A small random ViT in eval mode, with non-trivial norm and LayerScale parameters."""
    torch.manual_seed(seed)
    model = VIT_VARIANTS[variant]() if variant in VIT_VARIANTS else EVA_VARIANTS[variant]()
    with torch.no_grad():  # timm initialises norms to 1/0 and some heads to 0; randomise them
        for name, param in model.named_parameters():
            if "norm" in name or "ls" in name or "head" in name or "gamma" in name or name.endswith("_bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def randomise_parameters(model, words: tuple[str, ...], seed: int = 0):
    """Give the parameters whose names contain one of ``words`` trained-looking random values
    (fresh adapters, LoRA up-projections and PYRA token weights start at zero and would do
    nothing); returns the model in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(word in name for word in words):
                param.normal_(0, 0.3)
    return model.eval()


def tokens_entering(model, x, module: str = "norm1") -> list[int]:
    """Tokens entering ``block.<module>`` of each block in one forward pass (norm1: the block's
    attention; mlp: its MLP)."""
    counts, handles = [], []
    for block in model.blocks:
        hook = lambda m, args, out: counts.append(args[0].shape[1])
        handles.append(getattr(block, module).register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return counts


@pytest.fixture(params=list(VIT_VARIANTS))
def vit_variant(request) -> str:
    return request.param


def write_vtab_task(root: Path, num_classes: int = 3, per_class: int = 4, test_per_class: int = 2,
                    size: int = 20, seed: int = 0) -> Path:
    """A synthetic VTAB-1k task folder whose classes differ by colour (so they can be learned)."""
    rng = np.random.default_rng(seed)
    lists: dict[str, list[str]] = {"train": [], "test": []}
    for split, count in (("train", per_class), ("test", test_per_class)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        index = 0
        for label in range(num_classes):
            for _ in range(count):
                pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
                pixels[..., label % 3] += 150
                name = f"images/{split}/{index:06d}.jpg"
                Image.fromarray(pixels).save(root / name)
                lists[split].append(f"{name} {label}")
                index += 1
    train = lists["train"]
    (root / "train800val200.txt").write_text("\n".join(train) + "\n")
    (root / "train800.txt").write_text("\n".join(train[: len(train) * 4 // 5]) + "\n")
    (root / "val200.txt").write_text("\n".join(train[len(train) * 4 // 5:]) + "\n")
    (root / "test.txt").write_text("\n".join(lists["test"]) + "\n")
    return root


@pytest.fixture
def vtab_task(tmp_path) -> Path:
    return write_vtab_task(tmp_path / "task")


VTAB_MINI = Path(os.environ.get("TIETA_VTAB_MINI", Path(__file__).resolve().parents[2] / "shared" / "data" / "vtab-mini"))


@pytest.fixture
def vtab_mini() -> Path:
    if not VTAB_MINI.is_dir():
        pytest.skip(f"vtab-mini data not found at {VTAB_MINI} (set TIETA_VTAB_MINI)")
    return VTAB_MINI


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    """TIETA_HOME for the built-in assets: $TIETA_TEST_HOME, else $TIETA_HOME, else a new folder.

    Set TIETA_TEST_HOME to keep the downloaded wheels and built assets between test runs.
    """
    path = Path(os.environ.get("TIETA_TEST_HOME") or os.environ.get("TIETA_HOME")
                or tmp_path_factory.mktemp("tieta-home"))
    patch = pytest.MonkeyPatch()
    patch.setenv("TIETA_HOME", str(path))
    yield path
    patch.undo()


def fail_in_epoch(monkeypatch, epoch: int, error: BaseException = KeyboardInterrupt()) -> None:
    """Make the ``epoch``-th training epoch from now on raise ``error`` (Ctrl-C by default, or a
    crash); ``monkeypatch.undo()`` ends it."""
    from tieta.train import fit as fit_module

    real, calls = fit_module.train_one_epoch, []

    def train_one_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "train_one_epoch", train_one_epoch)


@pytest.fixture
def small_disk(tmp_path):
    """A real, small file system (a 4 MiB tmpfs) for full-disk tests; skipped where this process may
    not mount one (it needs root or CAP_SYS_ADMIN), since a simulated error proves less."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.decode(errors='replace').strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill_disk(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of ``folder`` until at most ``leave`` bytes are free; returns the filler
    file (delete it to make room again)."""
    import shutil

    filler = folder / "filler.bin"
    with open(filler, "ab") as handle:
        while shutil.disk_usage(folder).free > leave:
            chunk = max(4096, min(1 << 20, shutil.disk_usage(folder).free - leave))
            try:
                handle.write(b"\0" * chunk)
                handle.flush()
            except OSError:
                break
    return filler


def refused(capsys, *argv: str) -> str:
    """Run the CLI in-process and return its one sentence, asserting exit status 2 and no traceback.

    A usage error (argparse) is the usage lines and then one ``tieta <command>: error: ...`` line;
    any other refusal is exactly one ``tieta: error: ...`` line.
    """
    from tieta.cli import main

    try:
        code, usage = main(list(argv)), False
    except SystemExit as exit_info:
        code, usage = exit_info.code, True
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if usage:
        assert lines[-1].startswith("tieta ") and ": error: " in lines[-1], err
        return lines[-1]
    assert len(lines) == 1 and lines[0].startswith("tieta: error: "), err
    return lines[0]


@pytest.fixture
def quick_throughput(monkeypatch):
    """Training runs that check a path, not the speed: their throughput is timed over 3 batches."""
    from tieta.train import fit as fit_module

    real = fit_module.measure_throughput
    monkeypatch.setattr(fit_module, "measure_throughput",
                        lambda *args, **kwargs: real(*args, **{**kwargs, "min_seconds": 0.0, "max_steps": 3}))


def train_side_by_side(task: Path, folder: Path, common: list[str], flags_by_method: dict[str, list[str]]
                       ) -> dict[str, Path]:
    """One finished ``tieta train`` run per method on ``task``, side by side in ``folder`` (a sweep's
    layout: the method's name, "+" as "-"), their throughput timed over 2 batches (a path is checked,
    not the speed)."""
    from tieta.cli import main
    from tieta.train import fit as fit_module

    real = fit_module.measure_throughput
    runs = {method: folder / method.replace("+", "-") for method in flags_by_method}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fit_module, "measure_throughput",
                      lambda *args, **kwargs: real(*args, **{**kwargs, "min_seconds": 0.0, "max_steps": 2}))
        for method, flags in flags_by_method.items():
            assert main(["train", *common, "--method", method, *flags, "--data", str(task),
                         "--output", str(runs[method])]) == 0
    return runs


def pytest_collection_modifyitems(config, items):
    """Leave out the (method, ViT variant) pairs that a test module does not run, as its
    ``runs_on(method, variant)`` says, instead of collecting each to report it skipped."""
    kept, left_out = [], []
    for item in items:
        runs_on = getattr(getattr(item, "module", None), "runs_on", None)
        params = getattr(getattr(item, "callspec", None), "params", {})
        variant = params.get("vit_variant", params.get("some_variant"))
        method = params.get("method")
        if runs_on is not None and method is not None and variant is not None and not runs_on(method, variant):
            left_out.append(item)
        else:
            kept.append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept

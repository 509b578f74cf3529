"""``tieta import``: checkpoints in the PYRA, DyT and NOAH codes' key layouts, made here with random
values for timm's tiny ``test_vit`` (6 blocks, width 64, 2 heads), become run folders whose model
computes what the reference code computes.

The expected logits come from a forward pass written here from the reference code's semantics
(``docs/methods.md`` and the codes themselves), on the reference tensors directly, not through tieta's
modules: LoRA as ``qkv(x) + B A x``, PYRA's merge as ``merge_wavg`` with ``pyra_weight``, DyT's block
with its token select and adapter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from tests.conftest import write_vtab_task
import tieta
from tieta import activation_rates
from tieta.cli import main
from tieta.train.fit import load_run_model

MODEL, SIZE, CLASSES, WIDTH, HEADS, DEPTH = "test_vit", 64, 3, 64, 2, 6
TOKENS = (SIZE // 16) ** 2 + 1
PYRA_R = [4, 3, 2, 1, 0, 0]  # rows of pyra_a per block; blocks with r = 0 have no PYRA, as in the code
TINY = ["--model", MODEL, "--img-size", str(SIZE)]


def backbone_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random test_vit's state dict (the reference codes' backbone names are today's timm names),
    with norms and head randomised too."""
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, img_size=SIZE, num_classes=CLASSES)
    state = {}
    for name, tensor in model.state_dict().items():
        state[name] = tensor + torch.randn_like(tensor) * 0.1 if ("norm" in name or "head" in name) else tensor.clone()
    return state


def pyra_checkpoint(seed: int = 0, rank: int = 4) -> dict[str, torch.Tensor]:
    """A state dict in the PYRA code's layout: LoRA_a/LoRA_b on qkv, pyra_a/pyra_b/pyra_norm per block."""
    state = backbone_state(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for i in range(DEPTH):
        state[f"blocks.{i}.attn.LoRA_a.weight"] = torch.randn(rank, WIDTH, generator=generator) * 0.2
        state[f"blocks.{i}.attn.LoRA_b.weight"] = torch.randn(3 * WIDTH, rank, generator=generator) * 0.2
        if PYRA_R[i]:
            state[f"blocks.{i}.pyra_a"] = torch.randn(PYRA_R[i], 1, generator=generator)
            state[f"blocks.{i}.pyra_b"] = torch.randn(1, WIDTH, generator=generator) * 0.3
            state[f"blocks.{i}.pyra_norm.weight"] = 1 + torch.randn(WIDTH, generator=generator) * 0.1
            state[f"blocks.{i}.pyra_norm.bias"] = torch.randn(WIDTH, generator=generator) * 0.1
    return state


def dyt_checkpoint(seed: int = 0, dim: int = 6, learned_scale: bool = False) -> dict[str, torch.Tensor]:
    """A state dict in the DyT code's layout: mlp_token_select.mlp_head and adaptmlp per block."""
    state = backbone_state(seed)
    generator = torch.Generator().manual_seed(seed + 2)
    for i in range(DEPTH):
        # a bias around 0 so that some tokens are active and some are not
        state[f"blocks.{i}.mlp_token_select.mlp_head.weight"] = torch.randn(1, WIDTH, generator=generator) * 0.3
        state[f"blocks.{i}.mlp_token_select.mlp_head.bias"] = torch.randn(1, generator=generator) * 0.1
        state[f"blocks.{i}.adaptmlp.down_proj.weight"] = torch.randn(dim, WIDTH, generator=generator) * 0.3
        state[f"blocks.{i}.adaptmlp.down_proj.bias"] = torch.randn(dim, generator=generator) * 0.1
        state[f"blocks.{i}.adaptmlp.up_proj.weight"] = torch.randn(WIDTH, dim, generator=generator) * 0.3
        state[f"blocks.{i}.adaptmlp.up_proj.bias"] = torch.randn(WIDTH, generator=generator) * 0.1
        if learned_scale:
            state[f"blocks.{i}.adaptmlp.scale"] = torch.tensor([0.5 + 0.1 * i])
    return state


def noah_checkpoint(seed: int = 0, ranks=(4, 2, 4, 4, 3, 4)) -> dict[str, torch.Tensor]:
    """A state dict in the NOAH code's LoRA layout (ranks per block may differ)."""
    state = backbone_state(seed)
    generator = torch.Generator().manual_seed(seed + 3)
    for i, rank in enumerate(ranks):
        state[f"blocks.{i}.attn.LoRA_a.weight"] = torch.randn(rank, WIDTH, generator=generator) * 0.2
        state[f"blocks.{i}.attn.LoRA_b.weight"] = torch.randn(3 * WIDTH, rank, generator=generator) * 0.2
    return state


def save_pth(path: Path, state: dict[str, torch.Tensor], entry: str = "model", **args) -> Path:
    """As the reference scripts save: the state dict under "model", with optimizer state and args."""
    torch.save({entry: state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}, "epoch": 99,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(**args)}, path)
    return path


def plain_model(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """test_vit with the checkpoint's backbone and head."""
    model = timm.create_model(MODEL, img_size=SIZE, num_classes=CLASSES)
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    return model.eval()


def attention(block, h: torch.Tensor, state: dict, i: int, size=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The PYRA/NOAH code's attention: q, k, v each plus their part of LoRA_b(LoRA_a(h)); proportional
    attention adds log(size) to the logits. Returns (output, keys averaged over heads)."""
    B, N, C = h.shape
    qkv = block.attn.qkv(h)
    if f"blocks.{i}.attn.LoRA_a.weight" in state:
        lora_a, lora_b = state[f"blocks.{i}.attn.LoRA_a.weight"], state[f"blocks.{i}.attn.LoRA_b.weight"]
        qkv = qkv + F.linear(F.linear(h, lora_a), lora_b)
    q, k, v = qkv.reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * (C // HEADS) ** -0.5
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
    return block.attn.proj(out), k.mean(1)


def pyra_merge(x, size, metric, r, state, i):
    """merge_wavg(bipartite_soft_matching(metric, r, class_token=True), x, size, pyra_weight) of the
    PYRA code, written out."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[..., ::2, :] @ metric[..., 1::2, :].transpose(-1, -2)
    scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :].sort(dim=1)[0], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(t, modulate):
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        if modulate:
            pairs = src + dst.gather(dim=-2, index=dst_idx.expand(n, r, c))
            norm_weight, norm_bias = state[f"blocks.{i}.pyra_norm.weight"], state[f"blocks.{i}.pyra_norm.bias"]
            pairs = F.layer_norm(pairs, (c,), norm_weight, norm_bias)
            channel = 2 * torch.sigmoid(state[f"blocks.{i}.pyra_a"].transpose(0, 1) @ pairs)
            token = 2 * torch.sigmoid(pairs @ state[f"blocks.{i}.pyra_b"].transpose(0, 1)) - 1
            src = src + (src * channel) * token
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    x = merge(x * size, True)
    size = merge(size, False)
    return x / size, size


@torch.no_grad()
def pyra_reference_logits(state, images) -> torch.Tensor:
    """The PYRA code's ToMeBlock forward with LoRA and PYRA, on ``state``'s tensors."""
    model = plain_model(state)
    x = model._pos_embed(model.patch_embed(images))
    size = None
    for i, block in enumerate(model.blocks):
        out, metric = attention(block, block.norm1(x), state, i, size)
        x = x + out
        if PYRA_R[i] > 0:
            x, size = pyra_merge(x, size, metric, PYRA_R[i], state, i)
        x = x + block.mlp(block.norm2(x))
    return model.head(model.norm(x)[:, 0])


@torch.no_grad()
def dyt_reference_logits(state, images) -> torch.Tensor:
    """The DyT code's Block forward at evaluation: token select on x[:, 1:] (class token active),
    ``x + mask * mlp(norm2(x)) + adaptmlp(x)``."""
    model = plain_model(state)
    x = model._pos_embed(model.patch_embed(images))
    for i, block in enumerate(model.blocks):
        x = x + block.attn(block.norm1(x))
        logits = F.linear(x[:, 1:], state[f"blocks.{i}.mlp_token_select.mlp_head.weight"],
                          state[f"blocks.{i}.mlp_token_select.mlp_head.bias"])
        select = torch.cat([logits.new_ones(x.shape[0], 1, 1), (logits.sigmoid() > 0.5).float()], dim=1)
        adapter = f"blocks.{i}.adaptmlp"
        down = F.relu(F.linear(x, state[f"{adapter}.down_proj.weight"], state[f"{adapter}.down_proj.bias"]))
        adapt = F.linear(down, state[f"{adapter}.up_proj.weight"], state[f"{adapter}.up_proj.bias"])
        adapt = adapt * state.get(f"blocks.{i}.adaptmlp.scale", torch.tensor(1.0))
        x = x + select * block.mlp(block.norm2(x)) + adapt
    return model.head(model.norm(x)[:, 0])


@torch.no_grad()
def lora_reference_logits(state, images) -> torch.Tensor:
    """The NOAH code's LoRA: each block's qkv plus LoRA_b(LoRA_a(x)), scale 1."""
    model = plain_model(state)
    x = model._pos_embed(model.patch_embed(images))
    for i, block in enumerate(model.blocks):
        x = x + attention(block, block.norm1(x), state, i)[0]
        x = x + block.mlp(block.norm2(x))
    return model.head(model.norm(x)[:, 0])


def imported_logits(run: Path, images: torch.Tensor) -> torch.Tensor:
    model, _, _ = load_run_model(run)
    with torch.no_grad():
        return model.eval()(images)


def run_import(*argv) -> int:
    return main(["import", *map(str, argv)])


def error_of(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("tieta: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def images():
    return torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


def test_pyra_round_trip_gives_the_pyra_code_s_logits(tmp_path, images, capsys):
    state = pyra_checkpoint()
    source = save_pth(tmp_path / "best_checkpoint.pth", state, drop_path=0.1, drop_rate_LoRA=0.1, inception=False,
                      token_merging=True, pyra=True, merging_schedule="low", output_dir="out", input_size=SIZE)
    run = tmp_path / "run"
    assert run_import("--from", "pyra", source, "--output", run, "--model", MODEL) == 0  # the size: from args
    out = capsys.readouterr().out
    assert "as pyra+lora, 3 classes" in out and f"next: tieta eval {run}" in out
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["img_size"] == SIZE and config["method"] == "pyra+lora" and config["merge"]["schedule"] == PYRA_R
    assert config["lora"] == {"rank": 4, "targets": "qkv", "alpha": None, "dropout": 0.1}
    assert config["weights"] == str((run / "backbone.safetensors").resolve())
    assert json.loads((run / "state.json").read_text())["state"] == "finished"
    torch.testing.assert_close(imported_logits(run, images), pyra_reference_logits(state, images),
                               rtol=1e-5, atol=1e-5)


def test_dyt_round_trip_folds_a_learned_adapter_scale(tmp_path, images, capsys):
    state = dyt_checkpoint(learned_scale=True)
    source = save_pth(tmp_path / "checkpoint-99.pth", state, token_target_ratio=0.7, scale=1, drop_path=0.0)
    run = tmp_path / "run"
    assert run_import("--from", "dyt", source, "--output", run, *TINY) == 0
    assert "learned scales are folded" in capsys.readouterr().out
    model, config, _ = load_run_model(run)
    assert (config.method, config.dyt.adapter_dim, config.dyt.rho, config.data.normalization) == ("dyt", 6, 0.7,
                                                                                                   "inception")
    expected = dyt_reference_logits(state, images)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), expected, rtol=1e-5, atol=1e-5)
    rates = activation_rates(model, images)
    assert 0 < sum(rates) / len(rates) < 1  # the test dispatches: some tokens skip, some do not


def test_noah_lora_of_mixed_ranks_from_safetensors_with_module_prefix(tmp_path, images, capsys):
    state = noah_checkpoint()
    source = tmp_path / "noah.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, str(source))
    run = tmp_path / "run"
    assert run_import("--from", "noah", source, "--output", run, *TINY) == 0
    assert "kept no training arguments" in capsys.readouterr().out
    _, config, _ = load_run_model(run)
    assert (config.method, config.lora.rank, config.lora.alpha) == ("lora", 4, None)
    torch.testing.assert_close(imported_logits(run, images), lora_reference_logits(state, images),
                               rtol=1e-5, atol=1e-5)


def test_eval_works_on_an_imported_run(tmp_path, capsys):
    task = write_vtab_task(tmp_path / "task", num_classes=CLASSES)
    source = save_pth(tmp_path / "ckpt.pth", noah_checkpoint(ranks=(2,) * DEPTH), entry="state_dict")
    run = tmp_path / "run"
    assert run_import("--from", "noah", source, "--output", run, "--data", task, *TINY) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "lora" and result["images"] == 2 * CLASSES
    # the accuracy is the NOAH code's own on the task's test images, preprocessed as the run does
    from tieta.data.normalization import interpolation_of
    from tieta.data.transforms import Normalize
    from tieta.data.vtab import ImageDataset, open_task
    from tieta.train.record import run_normalization

    _, config, _ = load_run_model(run)
    items = open_task(task).split("test")
    dataset = ImageDataset(items, SIZE, CLASSES, interpolation=interpolation_of(run_normalization(config)))
    images = Normalize(run_normalization(config))(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    labels = torch.tensor([label for _, label in items])
    logits = lora_reference_logits(noah_checkpoint(ranks=(2,) * DEPTH), images)
    assert result["acc"] == pytest.approx(100.0 * float((logits.argmax(dim=-1) == labels).float().mean()))
    assert result["eval_loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-4)


def test_an_imported_run_exports_with_the_same_logits(tmp_path, images, capsys):
    state = pyra_checkpoint(seed=1)
    source = save_pth(tmp_path / "ckpt.pth", state, token_merging=True)
    run, export = tmp_path / "run", tmp_path / "export"
    assert run_import("--from", "pyra", source, "--output", run, *TINY) == 0
    assert main(["export", str(run), "--output", str(export)]) == 0
    with torch.no_grad():
        logits = tieta.load(export).eval()(images)
    torch.testing.assert_close(logits, pyra_reference_logits(state, images), rtol=1e-5, atol=1e-5)


def test_a_pyra_code_checkpoint_with_tome_only_takes_its_schedule_from_args_or_the_flag(tmp_path, capsys):
    state = {k: v for k, v in pyra_checkpoint().items() if "pyra" not in k}
    bare = tmp_path / "bare.safetensors"
    save_file(state, str(bare))
    assert run_import("--from", "pyra", bare, "--output", tmp_path / "a", *TINY) == 2
    assert "pass --schedule" in error_of(capsys)
    assert run_import("--from", "pyra", bare, "--output", tmp_path / "a", "--schedule", "[2,2]", *TINY) == 0
    assert load_run_model(tmp_path / "a")[1].method == "tome+lora"
    with_args = save_pth(tmp_path / "tome.pth", state, token_merging=False)
    assert run_import("--from", "pyra", with_args, "--output", tmp_path / "b", *TINY) == 0
    assert load_run_model(tmp_path / "b")[1].method == "lora"


@pytest.mark.parametrize("case", ["architecture", "missing", "extra", "text", "garbage_safetensors", "no_model",
                                  "noah_adapter", "wrong_code", "fixed_setting"])
def test_bad_input_is_one_sentence(tmp_path, capsys, case):
    state = pyra_checkpoint()
    source = tmp_path / "ckpt.pth"
    argv = ["--from", "pyra", source, "--output", tmp_path / "run", *TINY]
    if case == "architecture":
        save_pth(source, state)
        argv[-3] = "vit_tiny_patch16_224"
        expect = "cls_token is (1, 1, 64) in the checkpoint but (1, 1, 192) in the model"
    elif case == "missing":
        del state["blocks.1.pyra_norm.weight"], state["blocks.2.attn.LoRA_b.weight"]
        save_pth(source, state)
        expect = "lacks blocks.1.pyra_norm.weight, blocks.2.attn.LoRA_b.weight"
    elif case == "extra":
        state["blocks.0.attn.gate"] = torch.zeros(3)
        state["prompt_embeddings"] = torch.zeros(3)
        save_pth(source, state)
        expect = ("has keys that a PYRA-code checkpoint for test_vit with pyra+lora does not: blocks.0.attn.gate, "
                  "prompt_embeddings")
    elif case == "text":
        source.write_text("these are my notes, not weights\n")
        expect = "is not a checkpoint torch can read"
    elif case == "garbage_safetensors":
        source = tmp_path / "ckpt.safetensors"
        source.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
        argv[2] = source
        expect = "is not a readable safetensors file"
    elif case == "no_model":
        torch.save({"epoch": 3, "acc": 91.0}, source)
        expect = "holds no state dict"
    elif case == "noah_adapter":
        state = noah_checkpoint()
        state["blocks.0.adapter.ln1.weight"] = torch.zeros(8, WIDTH)
        save_pth(source, state)
        argv[1] = "noah"
        expect = "has blocks.0.adapter.ln1.weight: the NOAH-style adapter (also in the PYRA code) is sequential"
    elif case == "wrong_code":
        save_pth(source, state)
        argv[1] = "dyt"
        expect = "looks like a checkpoint of the PYRA code (blocks.0.pyra_a), not the DyT code's; import it with --from"
    else:
        save_pth(source, state)
        argv += ["--set", "lora.alpha=16"]
        expect = "--set lora.alpha: the import takes that from the checkpoint"
    assert run_import(*argv) == 2
    assert expect in error_of(capsys)
    assert not (tmp_path / "run").exists()


class _Payload:
    """Pickles as a call to os.system: what a malicious .pth does on an unsafe load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_with_code_is_refused_not_run(tmp_path, capsys):
    marker = tmp_path / "ran"
    source = tmp_path / "evil.pth"
    torch.save({"model": pyra_checkpoint(), "args": _Payload(marker)}, source)
    with open(tmp_path / "plain.pkl", "wb") as handle:  # a bare pickle, not torch's zip format
        pickle.dump({"model": _Payload(marker)}, handle)
    for path in (source, tmp_path / "plain.pkl"):
        assert run_import("--from", "pyra", path, "--output", tmp_path / "run", *TINY) == 2
        assert "whose loading could run code, so tieta refuses it" in error_of(capsys)
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_an_existing_output_is_refused_unless_overwrite(tmp_path, images, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    state = noah_checkpoint()
    source = save_pth(tmp_path / "ckpt.pth", state)
    assert run_import("--from", "noah", source, "--output", run, *TINY) == 2
    assert "already exists and is not empty" in error_of(capsys)
    assert run_import("--from", "noah", source, "--output", run, "--overwrite", *TINY) == 0
    assert not (run / "summary.json").exists() and (run / "notes.txt").read_text() == "mine"
    torch.testing.assert_close(imported_logits(run, images), lora_reference_logits(state, images),
                               rtol=1e-5, atol=1e-5)


def test_import_help_loads_no_torch():
    code = ("import sys\nfrom tieta.cli import main\n"
            "try:\n    main(['import', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch loaded'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--from {pyra,dyt,noah}" in result.stdout

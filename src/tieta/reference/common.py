"""Reading checkpoints written by the papers' public code, and renaming their keys to tieta's.

What the public training scripts save (``torch.save`` of a dict, read here without running code):

* PYRA (github.com/THU-MIG/PYRA, ``train.py``) and NOAH (github.com/ZhangYuanhan-AI/NOAH,
  ``supernet_train_prompt.py``): ``{"model": state_dict, "optimizer", "lr_scheduler", "epoch",
  "scaler", "args"}``, the whole ViT in the state dict (timm 0.5.4 key names).
* DyT (github.com/NUS-HPC-AI-Lab/Dynamic-Tuning, ``misc.save_model``): ``{"model", "optimizer",
  "epoch", "scaler", "args"}``, the whole ViT (timm 0.9-style key names).

``args`` is the script's ``argparse.Namespace``. ``.pth`` / ``.pt`` / ``.bin`` files are read with
``torch.load(weights_only=True)``, with ``argparse.Namespace`` as the one class allowed beyond
torch's own (it only holds attributes: rebuilding it runs no code); a file that needs anything else
is refused, never executed. ``.safetensors`` files hold a state dict alone. A state dict may sit at
the top level or under "model" / "state_dict" / "module", and its keys may carry DataParallel's
"module." prefix.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tieta.errors import TietaError

# where the scripts put the state dict inside the saved dict, in the order looked for
STATE_DICT_ENTRIES = ("model", "state_dict", "module")
PREFIX = "module."


@dataclass
class Reference:
    """A reference checkpoint as read.

    Attributes:
        path: the file.
        tensors: the state dict, reference key names ("module." removed), in the file's order.
        args: the training script's arguments where the file kept them (else empty).
    """

    path: Path
    tensors: dict[str, torch.Tensor]
    args: dict[str, Any] = field(default_factory=dict)


def _load_pickle(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of ``path``, its refusals turned into one sentence."""
    try:  # torch warns about pickle protocols it reads anyway; the outcome is said in one sentence
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        if "Weights only load failed" not in text:
            raise TietaError(f"{path} is not a checkpoint torch can read ({text.splitlines()[0]})") from None
        found = re.search(r"(?:GLOBAL|global) ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        raise TietaError(
            f"{path} holds pickled Python objects{what} whose loading could run code, so tieta refuses it (it reads "
            ".pth files with torch.load(weights_only=True)); if you trust the file, save its state dict alone, e.g. "
            f"torch.save(torch.load('{path}', weights_only=False)['model'], 'weights.pth'), and import that"
        ) from None
    except (RuntimeError, ValueError, EOFError, OSError, zipfile.BadZipFile, KeyError, TypeError,
            AttributeError, IndexError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TietaError(f"{path} is not a checkpoint torch can read ({first})") from None


def _state_dict_of(saved: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside what a script saved (itself, or one of ``STATE_DICT_ENTRIES``)."""
    if not isinstance(saved, dict):
        raise TietaError(f"{path} holds a {type(saved).__name__}, not a state dict or a dict holding one")
    state = saved
    if not all(isinstance(value, torch.Tensor) for value in saved.values()):
        state = next((saved[key] for key in STATE_DICT_ENTRIES if isinstance(saved.get(key), dict)), None)
        if state is None:
            raise TietaError(f"{path} holds no state dict: neither tensors nor a "
                             f"{' / '.join(repr(key) for key in STATE_DICT_ENTRIES)} entry of them")
    if not state:
        raise TietaError(f"{path} holds an empty state dict")
    odd = next((key for key, value in state.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)),
               None)
    if odd is not None:
        raise TietaError(f"{path}'s state dict has {odd!r}, which is not a named tensor")
    if all(key.startswith(PREFIX) for key in state):
        state = {key[len(PREFIX):]: value for key, value in state.items()}
    return dict(state)


def _args_of(saved: Any) -> dict[str, Any]:
    args = saved.get("args") if isinstance(saved, dict) else None
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return dict(args) if isinstance(args, dict) else {}


def read_reference(path: str | Path) -> Reference:
    """Read a reference checkpoint (see the module docstring for what is accepted).

    Raises:
        TietaError: the file is missing, unreadable, not a checkpoint, or needs code to load.
    """
    path = Path(path)
    if not path.is_file():
        raise TietaError(f"checkpoint {path} " + ("is a folder, not a file" if path.is_dir() else "does not exist"))
    if path.suffix == ".safetensors":
        try:
            saved: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise TietaError(f"{path} is not a readable safetensors file ({str(error).splitlines()[0]})") from None
    else:
        saved = _load_pickle(path)
    return Reference(path, _state_dict_of(saved, path), _args_of(saved))


@dataclass(frozen=True)
class Rename:
    """One key of a reference module and its tieta name, per block: ``{i}`` is the block index.

    Attributes:
        reference: e.g. "blocks.{i}.attn.LoRA_a.weight".
        tieta: e.g. "blocks.{i}.attn.qkv.lora_A".
    """

    reference: str
    tieta: str

    def _pattern(self, template: str) -> re.Pattern:
        return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + r"\Z")

    def match(self, key: str) -> Optional[int]:
        """The block index if ``key`` is this rule's reference key, else None."""
        found = self._pattern(self.reference).match(key)
        return int(found.group("i")) if found else None

    def reference_of(self, tieta_key: str) -> Optional[str]:
        """The reference key that becomes ``tieta_key``, or None if this rule does not make it."""
        found = self._pattern(self.tieta).match(tieta_key)
        return self.reference.format(i=found.group("i")) if found else None


def per_block(tensors: dict[str, torch.Tensor], rule: Rename) -> dict[int, torch.Tensor]:
    """{block index: tensor} of the keys ``rule`` matches."""
    found = {}
    for key, tensor in tensors.items():
        index = rule.match(key)
        if index is not None:
            found[index] = tensor
    return found


def pad_dim(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``tensor`` with zeros appended along ``dim`` up to ``size`` (a low-rank pair padded with zero
    rows and columns computes the same function)."""
    missing = size - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def refuse_unsupported(keys: Iterable[str], unsupported: list[tuple[str, str]], source: Path) -> None:
    """Refuse, with the module's own sentence, a checkpoint holding a module tieta cannot represent.

    Args:
        unsupported: (regular expression on the key, why tieta cannot take that module).
    """
    for pattern, reason in unsupported:
        hit = next((key for key in keys if re.search(pattern, key)), None)
        if hit is not None:
            raise TietaError(f"{source} has {hit}: {reason}")


def shape_text(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(size) for size in shape) + ")"


@dataclass
class Converted:
    """A reference checkpoint in tieta's terms, ready to be checked against the built model.

    Attributes:
        method: the tieta methods, e.g. "pyra+lora".
        settings: dotted config settings the checkpoint determines (``lora.rank``, ``merge.schedule``...).
        tensors: tieta key -> tensor; the backbone's keys keep their names.
        origin: tieta key -> the reference key it came from.
        renames: the rules used, to name a missing tieta key as the reference would.
        notes: what was assumed where the checkpoint does not say (printed by the command).
    """

    method: str
    settings: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    origin: dict[str, str]
    renames: tuple[Rename, ...]
    notes: list[str] = field(default_factory=list)

    def reference_name(self, tieta_key: str) -> str:
        for rule in self.renames:
            name = rule.reference_of(tieta_key)
            if name is not None:
                return name
        return tieta_key


def rename_all(tensors: dict[str, torch.Tensor], renames: tuple[Rename, ...],
               convert: Optional[Callable[[Rename, int, torch.Tensor], Optional[torch.Tensor]]] = None,
               ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every key renamed by the first rule that matches it (others keep their names), in order.

    Args:
        convert: (rule, block, tensor) -> the tensor tieta stores (None drops the key: it was
            folded into another); default: unchanged.

    Returns:
        (tieta key -> tensor, tieta key -> reference key).
    """
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in tensors.items():
        rule, index = next(((rule, rule.match(key)) for rule in renames if rule.match(key) is not None), (None, None))
        if rule is None:
            out[key], origin[key] = tensor, key
            continue
        value = convert(rule, index, tensor) if convert is not None else tensor
        if value is not None:
            name = rule.tieta.format(i=index)
            out[name], origin[name] = value, key
    return out, origin


def arg(args: dict[str, Any], name: str, default: Any, kind: type) -> Any:
    """``args[name]`` where the checkpoint kept it with the expected type, else ``default``."""
    value = args.get(name, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)) else default


# NOAH-style LoRA on the fused qkv projection, as both the NOAH and the PYRA code have it
# (``Attention.LoRA_a`` / ``LoRA_b``, nn.Linear without bias): qkv(x) + LoRA_b(LoRA_a(dropout(x))),
# scale 1. tieta's fused LoRA ("qkv" targets, alpha None) is the same function; LoRA_b (3D, rank)
# becomes lora_B (1, 3D, rank).
LORA_A = Rename("blocks.{i}.attn.LoRA_a.weight", "blocks.{i}.attn.qkv.lora_A")
LORA_B = Rename("blocks.{i}.attn.LoRA_b.weight", "blocks.{i}.attn.qkv.lora_B")
LORA_RENAMES = (LORA_A, LORA_B)

# modules of the PYRA and NOAH code that tieta has no equivalent for (regular expression, why)
NOAH_FAMILY_UNSUPPORTED = [
    (r"(^|\.)adapter\.ln[12]\.", "the NOAH-style adapter (also in the PYRA code) is sequential, on the MLP "
     "output, with QuickGELU (x + mlp + up(gelu(down(mlp)))), which tieta's AdaptFormer adapter (parallel to the MLP, "
     "ReLU, on the block stream) cannot represent"),
    (r"visual_prompt_token", "visual prompt tokens (VPT) are not implemented in tieta"),
    (r"prefix_tokens_(key|value)", "prefix tuning (learned attention keys and values) is not implemented in tieta"),
    (r"^pre_logits\.", "a representation (pre-logits) layer, which today's timm ViTs do not have"),
]


def matrix(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, refused with one sentence unless it is 2-D (a Linear's weight)."""
    if tensor.dim() != 2:
        raise TietaError(f"{key} is {shape_text(tensor.shape)} in the checkpoint, but it is a Linear layer's "
                         "weight, which is 2-D")
    return tensor


def lora_rank(tensors: dict[str, torch.Tensor]) -> int:
    """The rank tieta's LoRA needs: the largest of the blocks' (0 where there is no LoRA).

    Blocks of a smaller rank (NOAH's per-block search) are padded with zeros, which is exact."""
    ranks = [matrix(LORA_A.reference.format(i=i), a).shape[0] for i, a in per_block(tensors, LORA_A).items()]
    ranks += [matrix(LORA_B.reference.format(i=i), b).shape[1] for i, b in per_block(tensors, LORA_B).items()]
    return max(ranks, default=0)


def convert_lora(rank: int) -> Callable[[Rename, int, torch.Tensor], Optional[torch.Tensor]]:
    """The tensor converter for LoRA keys at ``rank`` (other keys pass unchanged)."""
    def convert(rule: Rename, index: int, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        if rule is LORA_A:
            return pad_dim(tensor, 0, rank)
        if rule is LORA_B:
            return pad_dim(tensor, 1, rank).unsqueeze(0)
        return tensor

    return convert


def normalization(args: dict[str, Any]) -> str:
    """The PYRA and NOAH scripts normalise with ImageNet's mean and std unless given --inception."""
    return "inception" if arg(args, "inception", False, bool) else "imagenet"

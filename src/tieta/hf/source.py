"""Where a ``transformers`` checkpoint is, what it holds, and the record of what was loaded.

A source is a folder written by ``save_pretrained`` (``config.json`` beside ``model.safetensors``,
``pytorch_model.bin`` or their sharded forms with an index) or ``hf:ORG/NAME``, a model hub
repository, fetched with ``huggingface_hub.snapshot_download`` into the hub cache.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import load as load_safetensors

from tieta.errors import TietaError
from tieta.files import file_sha256, read_json, read_regular

HUB_PREFIX = "hf:"
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
# the weights a save_pretrained folder holds, preferred first; an index names the shards of a large model
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# what snapshot_download fetches: the config, the processor's and the weights, nothing else (no
# TensorFlow or Flax copies of the same weights)
HUB_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin"]
MAX_CONFIG_BYTES = 4 << 20
MAX_WEIGHTS_BYTES = 64 << 30


def is_source(weights: Union[str, Path, None]) -> bool:
    """Whether ``weights`` names a ``transformers`` checkpoint: ``hf:ORG/NAME``, or a folder with a
    config.json (any other folder is left to be refused as the weights file it is not)."""
    if weights is None:
        return False
    if str(weights).startswith(HUB_PREFIX):
        return True
    try:
        return (Path(weights) / CONFIG_FILE).is_file()
    except (OSError, ValueError):  # a name too long for the file system, or one it cannot encode
        return False


def resolve(source: Union[str, Path]) -> Path:
    """The local folder of ``source``: the folder itself, or the hub repository's snapshot.

    Raises:
        TietaError: no such folder, no config.json in it, or a hub repository that cannot be had.
    """
    text = str(source)
    folder = _download(text[len(HUB_PREFIX):]) if text.startswith(HUB_PREFIX) else Path(text)
    if not folder.is_dir():
        raise TietaError(f"transformers checkpoint folder {folder} does not exist")
    if not (folder / CONFIG_FILE).is_file():
        raise TietaError(f"folder {folder} holds no {CONFIG_FILE}; give a folder written by transformers' "
                         "save_pretrained (config.json and model.safetensors), or a weights file")
    return folder


def _download(repo_id: str) -> Path:
    """The snapshot of the hub repository ``repo_id`` (fetched once, then read from the hub cache)."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise TietaError(f"hf: takes a model hub repository as hf:ORG/NAME, got hf:{repo_id}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise TietaError("reading hf:ORG/NAME needs huggingface_hub: pip install 'tieta[transformers]'") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # offline, unknown repository, gated, full disk: all one thing to the user
        why = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TietaError(f"could not get hf:{repo_id} from the model hub ({why}); give a local folder written "
                         "by save_pretrained instead") from error


def read_config(folder: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` (a mapping with a ``model_type``)."""
    config = read_json(folder / CONFIG_FILE, "transformers config", MAX_CONFIG_BYTES)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise TietaError(f"{folder / CONFIG_FILE} is not a transformers config (no model_type)")
    return config


def read_preprocessor(folder: Path) -> dict[str, Any]:
    """The processor's ``preprocessor_config.json``, or {} where the folder has none."""
    path = folder / PREPROCESSOR_FILE
    if not path.is_file():
        return {}
    found = read_json(path, "transformers preprocessor config", MAX_CONFIG_BYTES)
    if not isinstance(found, dict):
        raise TietaError(f"{path} should hold a mapping of settings")
    return found


def weight_files(folder: Path) -> list[Path]:
    """The files that hold the checkpoint's tensors: one, or the shards its index names."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    for name in INDEX_FILES:
        if (folder / name).is_file():
            index = read_json(folder / name, "transformers weights index", MAX_CONFIG_BYTES)
            shards = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(shards, dict) or not all(isinstance(shard, str) for shard in shards.values()):
                raise TietaError(f"{folder / name} is not a weights index (no weight_map)")
            files = [folder / shard for shard in sorted(set(shards.values()))]
            # a shard's name must stay in the folder: the index comes from the checkpoint's author
            if any(Path(shard).name != shard or not path.is_file() for shard, path in
                   zip(sorted(set(shards.values())), files)):
                raise TietaError(f"{folder / name} names shards that are not files of {folder}")
            return files
    raise TietaError(f"folder {folder} holds no weights ({' or '.join(WEIGHT_FILES)})")


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``folder``, read without running any of its code
    (safetensors, or ``torch.load(weights_only=True)``)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        data = read_regular(path, "transformers weights", MAX_WEIGHTS_BYTES)
        try:
            if path.suffix == ".safetensors":
                tensors.update(load_safetensors(data))
            else:
                found = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                if not isinstance(found, dict):
                    raise ValueError("it holds no mapping of tensors")
                tensors.update(found)
        except Exception as error:
            raise TietaError(f"could not read weights file {path}: "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    return tensors


def describe(source: Union[str, Path]) -> dict[str, Any]:
    """What a ``transformers`` source is, so that a run can be rebuilt from the same weights.

    Returns:
        {"kind": "transformers", "model_type": config.json's, "source": the hf: name as given or the
         folder's resolved path, "folder": the local folder read, "weights": [{"file": name,
         "sha256": hex digest}, ...] (one entry, or one per shard)}.
    """
    folder = resolve(source)
    text = str(source)
    return {"kind": "transformers", "model_type": read_config(folder)["model_type"],
            "source": text if text.startswith(HUB_PREFIX) else str(folder.resolve()),
            "folder": str(folder.resolve()),
            "weights": [{"file": path.name, "sha256": file_sha256(path)} for path in weight_files(folder)]}

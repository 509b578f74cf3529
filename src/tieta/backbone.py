"""load_backbone: a timm ViT by name, with weights from the hub, a local file or a built-in asset.

Local files are read with timm's own loaders, never by unpickling code: ``.safetensors`` directly,
``.pth`` / ``.pt`` / ``.bin`` through ``torch.load(weights_only=True)``, and Google's ``.npz`` ViT
checkpoints through timm's npz loader. The state dict then goes through the model family's
``checkpoint_filter_fn`` (timm's conversions, position-embedding resampling to ``img_size``) and is
loaded strictly but for the classifier, which is always reset to the task's classes.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn

try:  # timm fetches published weights with it; without it, from their URLs
    from huggingface_hub import constants as hub_constants
except ImportError:
    hub_constants = None

from tieta.errors import TietaError
from tieta.hf import load as hf_load, source as hf_source

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
RANDOM = "random"


# the largest image side tieta builds a model for, checked here too for what reaches timm without a run
# config (tieta import --img-size)
MAX_IMG_SIZE = 4096

# how long the model hub may take to accept a connection before it counts as unreachable (then
# only the local cache is read: timm's download would retry for about a minute)
HUB_CONNECT_SECONDS = 3.0
# how long the search for the timm model that a weights file was made for may take (it builds
# candidate models on the meta device, a tenth of a second or so each)
IDENTIFY_SECONDS = 3.0
# the embedding width that each size word in a timm ViT name stands for (vit_<size>_patch<P>_...)
_SIZE_WIDTHS = {"tiny": (192,), "small": (384,), "medium": (512,), "betwixt": (640,), "base": (768,),
                "large": (1024,), "so400m": (1152,), "huge": (1280,), "giant": (1408, 1536), "gigantic": (1664,)}


def builtin_weights() -> dict[str, Callable[[], Path]]:
    from tieta.data import assets  # imported lazily: building an asset needs the registry

    return {assets.SALIENCY_DINOV2_VITS14: assets.saliency_dinov2_vits14_weights}


def builtin_models() -> dict[str, str]:
    """Each built-in weights name -> the timm model they are for."""
    from tieta.data import assets

    return {assets.SALIENCY_DINOV2_VITS14: assets.SALIENCY_DINOV2_VITS14_MODEL}


def builtin_suggestion() -> str:
    """The clause that points to the built-in backbone, for messages about weights tieta cannot get."""
    weights, model = next(iter(builtin_models().items()))
    return f"tieta's built-in backbone is --model {model} --weights {weights} (no model hub needed)"


def missing_weights(path: Path) -> str:
    """Why ``path`` cannot be read as weights (it does not exist), and what to use instead."""
    close = difflib.get_close_matches(path.name, list(builtin_models()), n=1)
    if close:
        return (f"weights file {path} does not exist; did you mean the built-in {close[0]!r} "
                f"(for --model {builtin_models()[close[0]]})?")
    return f"weights file {path} does not exist; {builtin_suggestion()}"


def load_backbone(
    name: Optional[str] = None,
    weights: Optional[Union[str, Path]] = None,
    num_classes: int = 1000,
    img_size: Optional[int] = None,
    **timm_kwargs,
) -> nn.Module:
    """Create the timm model ``name`` with pretrained weights and a fresh head for ``num_classes``.

    Args:
        name: a timm model name, e.g. "vit_base_patch16_224"; None (or the same as ``weights``) where
            ``weights`` is a transformers checkpoint, whose config.json gives the architecture.
        weights: None for timm's published weights of ``name`` (from the model hub; where it does not
            answer within HUB_CONNECT_SECONDS, from the local hub cache alone);
            "random" for random initialisation; the name of a built-in asset
            ("dinov2_vits14_saliency"); a local .safetensors / .pth / .pt / .bin / .npz file; or a
            transformers checkpoint: a folder written by ``save_pretrained`` or "hf:ORG/NAME"
            (converted to the matching timm ViT by :mod:`tieta.hf`).
        num_classes: classes of the task; the head is always re-initialised for them.
        img_size: input resolution; position embeddings are resampled to it. None keeps the model's.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Returns:
        The model, in train mode, on the CPU.

    Raises:
        TietaError: an unknown model, or weights that cannot be had or do not fit; the sentence names
            the model they were made for, or the built-in backbone, where that helps.
    """
    transformers_model = _transformers_source(name, weights)
    if transformers_model is not None:
        if img_size is not None and (type(img_size) is not int or not 1 <= img_size <= MAX_IMG_SIZE):
            raise TietaError(f"img_size must be a whole number of pixels from 1 to {MAX_IMG_SIZE}, got {img_size!r}")
        return hf_load.load_hf_backbone(transformers_model, num_classes, img_size,
                                        random_weights=str(weights) == RANDOM, **timm_kwargs)
    if name is None:
        raise TietaError("give a timm model name (--model), or a transformers checkpoint as the weights (a folder "
                         "with the config.json and weights save_pretrained writes, or hf:ORG/NAME)")
    if img_size is not None:
        timm_kwargs["img_size"] = img_size
    builtin = builtin_weights()
    if weights is None:
        model = _from_hub(name, num_classes=num_classes, **timm_kwargs)
        model.reset_classifier(num_classes)  # even where the published head has as many classes
        return model
    if str(weights) in builtin:
        _check_builtin_fits(name, str(weights))  # before the asset is built (a download the first time)
    model = _create(name, pretrained=False, num_classes=num_classes, **timm_kwargs)
    if str(weights) == RANDOM:
        return model
    path = builtin[str(weights)]() if str(weights) in builtin else Path(weights)
    load_weights_file(model, path)
    return model


def _transformers_source(name: Optional[str], weights: Optional[Union[str, Path]]) -> Optional[str]:
    """The transformers checkpoint that gives the model, where ``weights`` or ``name`` is one (a
    config that leaves out the model names the checkpoint twice); None for a timm model.

    Raises:
        TietaError: a timm model name given with a transformers checkpoint as its weights.
    """
    if weights is not None and str(weights) != RANDOM and hf_source.is_source(weights):
        if name is not None and name != str(weights):
            raise TietaError(f"the weights {weights} are a transformers checkpoint, whose config.json gives the "
                             f"architecture; leave out the model name ({name})")
        return str(weights)
    if name is not None and not timm.is_model(name) and hf_source.is_source(name):
        if weights is not None and str(weights) != RANDOM and str(weights) != name:
            raise TietaError(f"the model {name} is a transformers checkpoint and brings its own weights; give them "
                             f"as the weights too, or 'random'")
        return name
    return None


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise TietaError(f"timm has no model named {name!r}{hint}")


def _check_builtin_fits(name: str, weights: str) -> None:
    """Refuse a built-in weights name for another model than the one it was made for."""
    _check_name(name)
    made_for = builtin_models()[weights]
    if name.split(".")[0] != made_for:
        raise TietaError(f"the built-in weights {weights!r} are for timm's {made_for}, not {name}; "
                         f"use --model {made_for} --weights {weights}")


def _from_hub(name: str, **kwargs) -> nn.Module:
    """``name`` with timm's published weights; where the hub cannot be reached, from the local cache
    alone (at once, instead of a minute of retries)."""
    address = None if {"pretrained_cfg", "pretrained_cfg_overlay"} & set(kwargs) else _hub_address(name)
    if address is None or _reachable(*address):
        return _create(name, pretrained=True, **kwargs)
    with _hub_offline():
        return _create(name, pretrained=True, unreachable=address[0], **kwargs)


def _hub_address(name: str) -> Optional[tuple[str, int]]:
    """The host and port timm fetches the published weights of ``name`` from (the Hugging Face hub,
    or the proxy to it); None where they come from elsewhere or offline mode is already on."""
    cfg = get_pretrained_cfg(name) if timm.is_model(name) else None
    if hub_constants is None or cfg is None or not cfg.hf_hub_id or hub_constants.HF_HUB_OFFLINE:
        return None
    endpoint = urllib.parse.urlsplit(hub_constants.ENDPOINT)
    host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname, proxy_url.port or (443 if proxy_url.scheme == "https" else 80)
    return (host, port) if host else None


def _reachable(host: str, port: int) -> bool:
    """Whether ``host`` accepts a connection within HUB_CONNECT_SECONDS, name lookup included (which a
    socket timeout does not bound, so the attempt runs in a thread that is not waited for longer)."""
    answer: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_CONNECT_SECONDS).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(HUB_CONNECT_SECONDS)
    return bool(answer and answer[0])


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub's offline mode for a while: files come from the local cache or fail at once."""
    before = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = before


def _create(name: str, pretrained: bool, unreachable: Optional[str] = None, **kwargs) -> nn.Module:
    """``timm.create_model`` with one sentence for what goes wrong; ``unreachable``: the hub host
    that could not be reached (the weights were looked for in the local cache only)."""
    _check_name(name)
    img_size = kwargs.get("img_size")
    if img_size is not None and (type(img_size) is not int or not 1 <= img_size <= MAX_IMG_SIZE):
        raise TietaError(f"img_size must be a whole number of pixels from 1 to {MAX_IMG_SIZE}, got {img_size!r}")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TietaError:
        raise
    except Exception as error:  # network, hub and config errors all mean the same thing to the user
        if isinstance(error, TypeError) and "img_size" in str(error):
            raise TietaError(f"timm's {name} takes no img_size: it is not a VisionTransformer, the models tieta "
                             "works on") from error
        if pretrained:
            why = (f"{unreachable} cannot be reached from here and they are not in the local cache" if unreachable
                   else f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}")
            raise TietaError(f"could not get the published weights of {name} from the model hub ({why}); pass a "
                             f"local weights file or 'random'; {builtin_suggestion()}") from error
        raise TietaError(f"timm could not build {name}: {error}") from error
    _check_patch_grid(model, name, img_size)
    return model


def _check_patch_grid(model: nn.Module, name: str, img_size: Optional[int]) -> None:
    """Refuse an input size the patches do not tile (timm would only fail at the first forward pass)."""
    patch_embed = getattr(model, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    if img_size is None or patch is None or getattr(patch_embed, "dynamic_img_pad", False):
        return
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    if any(img_size % side for side in patch):
        side = patch[0] if patch[0] == patch[1] else "x".join(map(str, patch))
        lower = img_size - img_size % patch[0]
        near = " or ".join(str(size) for size in (lower, lower + patch[0]) if size > 0)
        raise TietaError(f"img_size {img_size} is not a multiple of {name}'s patch size {side}; use e.g. {near}")


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a local weights file into ``model``, strictly for every parameter but the classifier.

    Raises:
        TietaError: the file is missing, of an unknown kind, unreadable, or does not fit the model.
    """
    path = Path(path)
    if not path.exists():
        raise TietaError(missing_weights(path))
    if not path.is_file():
        raise TietaError(f"weights file {path} is not a file")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise TietaError(f"weights file {path} should end in one of {', '.join(WEIGHT_SUFFIXES)}")
    if path.suffix == ".npz":
        _load_npz(model, path)
        return
    try:
        state_dict = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as error:
        raise TietaError(f"could not read weights file {path}: {str(error).splitlines()[0]}") from error
    as_read = state_dict
    filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as error:
            raise TietaError(f"weights file {path} does not fit {_model_name(model)} "
                             f"({str(error).splitlines()[0] if str(error) else type(error).__name__})"
                             f"{_made_for(as_read, model)}") from error
    head_names = _head_names(model)
    state_dict = {k: v for k, v in state_dict.items() if k.split(".")[0] not in head_names}
    expected = {k: v.shape for k, v in model.state_dict().items() if k.split(".")[0] not in head_names}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise TietaError(f"weights file {path} does not fit {_model_name(model)} ({detail}){_made_for(as_read, model)}")
    model.load_state_dict(state_dict, strict=False)


def _model_name(model: nn.Module) -> str:
    """timm's name of ``model`` (its architecture), else its class's."""
    cfg = getattr(model, "pretrained_cfg", None)
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    return name or type(model).__name__


def _shape_facts(state_dict: dict[str, torch.Tensor]) -> Optional[tuple[int, int, int]]:
    """(embedding width, blocks, patch size) of a timm ViT state dict; None where it has no timm
    patch embedding (another layout, or not a ViT)."""
    projection = state_dict.get("patch_embed.proj.weight")
    if not isinstance(projection, torch.Tensor) or projection.dim() != 4:
        return None
    blocks = {int(found.group(1)) for key in state_dict if (found := re.match(r"blocks\.(\d+)\.", key))}
    cls_token = state_dict.get("cls_token")
    width = cls_token.shape[-1] if isinstance(cls_token, torch.Tensor) else projection.shape[0]
    return int(width), len(blocks), int(projection.shape[-1])


def _made_for(state_dict: dict[str, torch.Tensor], model: nn.Module) -> str:
    """The clause that says which timm model ``state_dict`` was made for, where its shapes are not
    ``model``'s (empty where they are: then a tensor is missing or extra, not the model wrong)."""
    facts = _shape_facts(state_dict)
    if facts is None or facts == _shape_facts(model.state_dict()):
        return ""
    shapes = f"width {facts[0]}, {facts[1]} blocks, patch {facts[2]}"
    found = [name for name in identify_model(state_dict) if name != _model_name(model)]
    if found:
        return f"; its tensors are those of timm's {found[0]} ({shapes}): use --model {found[0]}"
    return f"; no timm ViT with published weights has its shapes ({shapes}); {builtin_suggestion()}"


def _named_widths(name: str) -> tuple[int, ...]:
    """The widths the size word in a timm ViT name stands for ("vit_relpos_base_patch16_224": 768);
    none where it has no size word tieta knows."""
    for word in name.split("_patch")[0].split("_")[1:]:
        if word in _SIZE_WIDTHS:
            return _SIZE_WIDTHS[word]
    return ()


def _meta_shapes(name: str) -> Optional[dict[str, torch.Tensor]]:
    """The state dict of timm's ``name`` on the meta device (shapes only), without its weight
    initialisation where the model allows; None where it cannot be built so."""
    for kwargs in ({"weight_init": "skip"}, {}):
        try:
            with torch.device("meta"):
                return timm.create_model(name, pretrained=False, **kwargs).state_dict()
        except Exception:  # a model that takes no weight_init, or cannot be built on the meta device
            continue
    return None


def identify_model(state_dict: dict[str, torch.Tensor], seconds: float = IDENTIFY_SECONDS) -> list[str]:
    """The timm ViTs with published weights whose tensors have the names and shapes of
    ``state_dict`` (the head and the number of positions aside), those of the same input size first.

    Candidates come from their names (the patch size, and the width a size word such as "small"
    stands for: a name without a known size word is not tried), each built on the meta device (no
    memory, no weights), the plainest names first, for at most ``seconds``.
    """
    facts = _shape_facts(state_dict)
    if facts is None:
        return []
    width, _, patch = facts
    names = {name.split(".")[0] for name in timm.list_models("vit_*", pretrained=True)}
    names = [name for name in sorted(names, key=lambda name: (len(name), name))  # the plainest names first
             if re.search(rf"_patch{patch}(?!\d)", name) and width in _named_widths(name)]
    given, exact, close = _shapes(state_dict), [], []
    deadline = time.monotonic() + seconds
    for name in names:
        if exact or time.monotonic() > deadline:
            break
        built = _meta_shapes(name)
        if built is None:
            continue
        candidate = _shapes(built)
        # the positions aside: the checkpoint filter resamples them to the model's input size
        if candidate.keys() == given.keys() and all(candidate[k] == given[k] for k in given if k != "pos_embed"):
            (exact if candidate.get("pos_embed") == given.get("pos_embed") else close).append(name)
    return exact + close


def _shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, the classifier's left out."""
    return {key: tuple(value.shape) for key, value in state_dict.items()
            if key.split(".")[0] not in ("head", "head_dist")}


def _load_npz(model: nn.Module, path: Path) -> None:
    loader = getattr(model, "load_pretrained", None)
    if loader is None:
        raise TietaError(f"{type(model).__name__} has no loader for Google .npz checkpoints")
    num_classes = model.num_classes
    try:
        loader(str(path))
    except Exception as error:
        raise TietaError(f"weights file {path} does not fit this model ({type(error).__name__}: {error})") from error
    model.reset_classifier(num_classes)  # the checkpoint's head was trained for another task


def _head_names(model: nn.Module) -> set[str]:
    return {name for name in ("head", "head_dist") if isinstance(getattr(model, name, None), nn.Module)}


"""Each supported ``transformers`` vision model as a timm ``VisionTransformer``: its config as timm's
arguments, its tensors under timm's names (and back, for the export).

Families (config.json's ``model_type``):

- ``vit`` (ViTModel, ViTForImageClassification): class token, post-norm on every token, GELU;
- ``dinov2`` / ``dinov2_with_registers`` (Dinov2Model, ...): as ViT, with LayerScale and register
  tokens (DINOv2's class token has a position embedding, registers do not: timm's ``no_embed_class``
  layout, with the class token's position added into the class token);
- ``clip`` / ``clip_vision_model`` (CLIPModel's vision tower, CLIPVisionModel): a norm before the
  blocks (timm's ``pre_norm``: no patch bias), quick-GELU; the pooled output is the final norm of
  the class token;
- ``siglip`` / ``siglip_vision_model`` (SiglipModel's vision tower, SiglipVisionModel): no class
  token, tanh-GELU, attention pooling over every token (timm's ``global_pool="map"``).

A saved checkpoint names its tensors as transformers 4 did (transformers 5 writes the same names),
under a prefix that depends on the class saved ("vit.", "dinov2.", "vision_model." or none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tieta.errors import TietaError

# config.json's model_type -> the family whose layout it has
FAMILIES = {"vit": "vit", "dinov2": "dinov2", "dinov2_with_registers": "dinov2", "clip": "clip",
            "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}
# where a full two-tower model (CLIPModel, SiglipModel) keeps the image tower's settings
TOWER_CONFIG = "vision_config"
# transformers' defaults for what a config.json may leave out (its classes' constructor defaults)
DEFAULTS = {
    "vit": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
                qkv_bias=True),
    "dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, hidden_act="gelu",
                   layer_norm_eps=1e-6, image_size=224, patch_size=14, num_channels=3, qkv_bias=True,
                   layerscale_value=1.0, use_swiglu_ffn=False, num_register_tokens=0),
    "clip": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5, image_size=224, patch_size=32, num_channels=3),
    "siglip": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, image_size=224, patch_size=16,
                   num_channels=3, vision_use_head=True),
}
# transformers' activation name -> timm's (gelu_new is the tanh approximation written out)
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
# the prefixes the tensors of each family sit under, by the class that saved them
PREFIXES = {"vit": ("vit.", ""), "dinov2": ("dinov2.", "dinov2_with_registers.", ""), "clip": ("vision_model.", ""),
            "siglip": ("vision_model.", "")}


@dataclass
class Architecture:
    """A transformers checkpoint's vision model, as timm needs it."""

    family: str  # a key of DEFAULTS
    model_type: str  # config.json's
    settings: dict[str, Any]  # the image tower's config, transformers' defaults filled in
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # VisionTransformer's arguments

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid the checkpoint's position embeddings were trained for."""
        image, patch = _pair(self.settings["image_size"]), _pair(self.settings["patch_size"])
        return image[0] // patch[0], image[1] // patch[1]

    @property
    def registers(self) -> int:
        return int(self.settings.get("num_register_tokens") or 0) if self.family == "dinov2" else 0


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def architecture(config: dict[str, Any], where: str) -> Architecture:
    """The timm ``VisionTransformer`` arguments of a transformers config (``where``: its file, for
    messages).

    Raises:
        TietaError: a model type or a setting that has no timm counterpart.
    """
    model_type = config["model_type"]
    family = FAMILIES.get(model_type)
    if family is None:
        raise TietaError(f"{where} is a {model_type!r} model; tieta converts transformers' "
                         f"{', '.join(sorted(FAMILIES))} models")
    tower = config.get(TOWER_CONFIG) if model_type in ("clip", "siglip") else config
    if not isinstance(tower, dict):
        raise TietaError(f"{where} has no {TOWER_CONFIG} for the image tower of its {model_type} model")
    settings = {**DEFAULTS[family], **{key: value for key, value in tower.items() if value is not None}}
    activation = ACTIVATIONS.get(settings["hidden_act"])
    if activation is None:
        raise TietaError(f"{where} uses the activation {settings['hidden_act']!r}, which timm's ViT blocks do not "
                         f"offer; tieta converts {', '.join(ACTIVATIONS)}")
    if settings.get("use_swiglu_ffn"):
        raise TietaError(f"{where} uses DINOv2's SwiGLU MLP, which tieta does not convert")
    width = int(settings["hidden_size"])
    hidden = (int(width * settings["mlp_ratio"]) if family == "dinov2" else int(settings["intermediate_size"]))
    # timm sizes the MLP as int(width * mlp_ratio): a ratio that lands exactly on ``hidden``
    mlp_ratio = hidden / width if int(width * (hidden / width)) == hidden else (hidden + 0.5) / width
    kwargs: dict[str, Any] = dict(
        img_size=_pair(settings["image_size"]), patch_size=_pair(settings["patch_size"]),
        in_chans=int(settings["num_channels"]), embed_dim=width, depth=int(settings["num_hidden_layers"]),
        num_heads=int(settings["num_attention_heads"]), mlp_ratio=mlp_ratio,
        qkv_bias=bool(settings.get("qkv_bias", True)), act_layer=activation,
        norm_layer=partial(nn.LayerNorm, eps=float(settings["layer_norm_eps"])))
    if family == "dinov2":
        registers = int(settings.get("num_register_tokens") or 0)
        kwargs.update(init_values=float(settings["layerscale_value"]), reg_tokens=registers,
                      no_embed_class=registers > 0)
    elif family == "clip":
        kwargs.update(pre_norm=True)
    elif family == "siglip":
        pooled = bool(settings["vision_use_head"])
        kwargs.update(class_token=False, global_pool="map" if pooled else "avg", fc_norm=False)
    return Architecture(family, model_type, settings, kwargs)


def _layer_names(family: str, i: int) -> list[tuple[str, str]]:
    """(transformers name, timm name) of block ``i``'s tensors, the q/k/v projections aside."""
    if family in ("vit", "dinov2"):
        hf = f"encoder.layer.{i}."
        names = [(hf + "attention.output.dense", "attn.proj")]
        if family == "vit":
            names += [(hf + "layernorm_before", "norm1"), (hf + "layernorm_after", "norm2"),
                      (hf + "intermediate.dense", "mlp.fc1"), (hf + "output.dense", "mlp.fc2")]
        else:
            names += [(hf + "norm1", "norm1"), (hf + "norm2", "norm2"), (hf + "mlp.fc1", "mlp.fc1"),
                      (hf + "mlp.fc2", "mlp.fc2")]
    else:
        hf = f"encoder.layers.{i}."
        names = [(hf + "self_attn.out_proj", "attn.proj"), (hf + "layer_norm1", "norm1"),
                 (hf + "layer_norm2", "norm2"), (hf + "mlp.fc1", "mlp.fc1"), (hf + "mlp.fc2", "mlp.fc2")]
    pairs = [(f"{a}.{kind}", f"blocks.{i}.{b}.{kind}") for a, b in names for kind in ("weight", "bias")]
    if family == "dinov2":
        pairs += [(f"{hf}layer_scale{n}.lambda1", f"blocks.{i}.ls{n}.gamma") for n in (1, 2)]
    return pairs


def _qkv_names(family: str, i: int) -> tuple[list[str], str]:
    """Block ``i``'s q, k, v projections in transformers (without .weight / .bias) and timm's fused one."""
    if family in ("vit", "dinov2"):
        parts = [f"encoder.layer.{i}.attention.attention.{name}" for name in ("query", "key", "value")]
    else:
        parts = [f"encoder.layers.{i}.self_attn.{name}_proj" for name in ("q", "k", "v")]
    return parts, f"blocks.{i}.attn.qkv"


def name_pairs(arch: Architecture) -> list[tuple[str, str]]:
    """(transformers name, timm name) of every tensor that maps one to one (shapes may differ by
    leading ones: transformers' (D,) class embedding is timm's (1, 1, D) class token)."""
    family = arch.family
    if family in ("vit", "dinov2"):
        pairs = [("embeddings.cls_token", "cls_token"), ("embeddings.position_embeddings", "pos_embed"),
                 ("embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight"),
                 ("embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias"),
                 ("layernorm.weight", "norm.weight"), ("layernorm.bias", "norm.bias")]
        if arch.registers:
            pairs.append(("embeddings.register_tokens", "reg_token"))
    else:
        pairs = [("embeddings.patch_embedding.weight", "patch_embed.proj.weight"),
                 ("embeddings.position_embedding.weight", "pos_embed"),
                 ("post_layernorm.weight", "norm.weight"), ("post_layernorm.bias", "norm.bias")]
    if family == "clip":
        pairs += [("embeddings.class_embedding", "cls_token"), ("pre_layrnorm.weight", "norm_pre.weight"),
                  ("pre_layrnorm.bias", "norm_pre.bias")]
    if family == "siglip":
        pairs.append(("embeddings.patch_embedding.bias", "patch_embed.proj.bias"))
        if arch.settings["vision_use_head"]:
            pairs += [("head.probe", "attn_pool.latent")]
            pairs += [(f"head.{a}.{kind}", f"attn_pool.{b}.{kind}") for a, b in
                      (("attention.out_proj", "proj"), ("layernorm", "norm"), ("mlp.fc1", "mlp.fc1"),
                       ("mlp.fc2", "mlp.fc2")) for kind in ("weight", "bias")]
    for i in range(int(arch.settings["num_hidden_layers"])):
        pairs += _layer_names(family, i)
    return pairs


def find_prefix(arch: Architecture, tensors: dict[str, torch.Tensor], where: str) -> str:
    """The prefix the image tower's tensors sit under ("vit.", "vision_model.", ...)."""
    probe = name_pairs(arch)[0][0]
    for prefix in PREFIXES[arch.family]:
        if prefix + probe in tensors:
            return prefix
    raise TietaError(f"{where} holds no {arch.model_type} image model (no {probe} under "
                     f"{' or '.join(repr(p) for p in PREFIXES[arch.family] if p)} or at the top)")


def to_timm(arch: Architecture, tensors: dict[str, torch.Tensor], model: nn.Module,
            where: str) -> dict[str, torch.Tensor]:
    """The checkpoint's image-tower tensors under timm's names, shaped as ``model``'s (position
    embeddings resampled to its patch grid with timm's resample); the classifier is left out.

    Raises:
        TietaError: a tensor the family needs is missing or has another shape than the config says.
    """
    prefix = find_prefix(arch, tensors, where)
    expected = model.state_dict()

    def take(name: str) -> torch.Tensor:
        found = tensors.get(prefix + name)
        if found is None:
            raise TietaError(f"{where} lacks {prefix + name}, which its config.json's {arch.model_type} model has")
        return found

    converted = {timm_name: take(hf_name) for hf_name, timm_name in name_pairs(arch)}
    for i in range(int(arch.settings["num_hidden_layers"])):
        parts, fused = _qkv_names(arch.family, i)
        converted[f"{fused}.weight"] = torch.cat([take(f"{part}.weight") for part in parts])
        if arch.timm_kwargs["qkv_bias"]:
            converted[f"{fused}.bias"] = torch.cat([take(f"{part}.bias") for part in parts])
    if arch.family == "siglip" and arch.settings["vision_use_head"]:
        joint, bias = take("head.attention.in_proj_weight"), take("head.attention.in_proj_bias")
        width = joint.shape[1]
        converted.update({"attn_pool.q.weight": joint[:width], "attn_pool.kv.weight": joint[width:],
                          "attn_pool.q.bias": bias[:width], "attn_pool.kv.bias": bias[width:]})
    _fold_class_position(arch, converted)
    converted["pos_embed"] = _resampled(arch, converted["pos_embed"], model)
    for name, tensor in converted.items():
        target = expected.get(name)
        if target is None or tensor.numel() != target.numel():
            raise TietaError(f"{where}: {name} has shape {tuple(tensor.shape)}, which does not fit its config.json "
                             f"(the model it describes has {None if target is None else tuple(target.shape)})")
        converted[name] = tensor.reshape(target.shape).to(target.dtype)
    return converted


def from_timm(arch: Architecture, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_timm` for a timm model of ``arch``'s layout (the head left out): its
    tensors under the names a transformers checkpoint of the family saves, under ``prefix``."""
    width = tensors["patch_embed.proj.weight"].shape[0]
    converted = {hf_name: tensors[timm_name] for hf_name, timm_name in name_pairs(arch)}
    for i in range(int(arch.settings["num_hidden_layers"])):
        parts, fused = _qkv_names(arch.family, i)
        kinds = ("weight", "bias") if f"{fused}.bias" in tensors else ("weight",)
        for kind in kinds:
            for part, chunk in zip(parts, tensors[f"{fused}.{kind}"].chunk(3)):
                converted[f"{part}.{kind}"] = chunk
    if arch.family in ("clip", "siglip"):  # transformers keeps these without the batch axis
        converted["embeddings.position_embedding.weight"] = tensors["pos_embed"].reshape(-1, width)
    if arch.family == "clip":
        converted["embeddings.class_embedding"] = tensors["cls_token"].reshape(width)
    if arch.family == "siglip" and arch.settings["vision_use_head"]:
        converted["head.attention.in_proj_weight"] = torch.cat([tensors["attn_pool.q.weight"],
                                                                tensors["attn_pool.kv.weight"]])
        converted["head.attention.in_proj_bias"] = torch.cat([tensors["attn_pool.q.bias"],
                                                              tensors["attn_pool.kv.bias"]])
    if arch.family == "dinov2":
        converted["embeddings.mask_token"] = torch.zeros(1, width)  # used only for masked pre-training
        if arch.registers:  # the class token's position is already in the class token (no_embed_class)
            converted["embeddings.position_embeddings"] = torch.cat([torch.zeros(1, 1, width), tensors["pos_embed"]],
                                                                    dim=1)
    return {prefix + name: tensor.detach().contiguous() for name, tensor in converted.items()}


def _fold_class_position(arch: Architecture, converted: dict[str, torch.Tensor]) -> None:
    """DINOv2 with registers adds the first position embedding to the class token only, and none to
    the registers: timm's no_embed_class layout with that position folded into the class token."""
    if not arch.registers:
        return
    positions = converted["pos_embed"].reshape(1, -1, converted["pos_embed"].shape[-1])
    converted["cls_token"] = converted["cls_token"].reshape(1, 1, -1) + positions[:, :1]
    converted["pos_embed"] = positions[:, 1:]


def _resampled(arch: Architecture, positions: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The position embeddings for ``model``'s patch grid (timm's resample: bicubic, antialiased)."""
    width = positions.shape[-1]
    positions = positions.reshape(1, -1, width)
    grid = tuple(model.patch_embed.grid_size)
    if grid == arch.grid:
        return positions
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    return resample_abs_pos_embed(positions, new_size=list(grid), old_size=list(arch.grid),
                                  num_prefix_tokens=prefix, verbose=False)


def build(arch: Architecture, num_classes: int, img_size: Any = None, **timm_kwargs) -> nn.Module:
    """The timm ``VisionTransformer`` of ``arch`` (random weights), for ``img_size`` where given."""
    kwargs = {**arch.timm_kwargs, **timm_kwargs, "num_classes": num_classes}
    if img_size is not None:
        kwargs["img_size"] = img_size
    return VisionTransformer(**kwargs)

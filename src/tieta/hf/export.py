"""``tieta export --format transformers``: a LoRA-trained timm ViT as a ``transformers`` model folder.

LoRA is folded into the weights first, so the model is the backbone's own architecture again and
transformers runs exactly what tieta runs:

- a ViT (class token, post-norm) becomes ``ViTForImageClassification``;
- a DINOv2 ViT (LayerScale, registers if any) becomes ``Dinov2ForImageClassification`` (or
  ``Dinov2WithRegistersForImageClassification``), whose classifier reads the class token beside
  the mean of the patch tokens: the trained head's weights go to the class-token half, zeros to
  the other, so the logits are the same;
- a CLIP or SigLIP image tower becomes ``CLIPVisionModel`` or ``SiglipVisionModel`` (transformers'
  classifiers for them pool otherwise than the trained head), with the head in
  ``tieta_head.safetensors``: logits = pooler_output @ weight.T + bias.

Methods that change what the network computes are refused: token reduction (transformers would run
all tokens), and adapters, which cannot be folded into the weights. The folder also gets a
``preprocessor_config.json`` with the run's input size and normalisation, and
``tieta_transformers.json``, which says how to read the logits and how far transformers' logits
were from tieta's on random images when the folder was written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import tieta
from tieta.data.transforms import INTERPOLATIONS, normalization_numbers
from tieta.errors import TietaError
from tieta.files import write_file
from tieta.hf.convert import Architecture, from_timm

NOTE_FILE = "tieta_transformers.json"
HEAD_FILE = "tieta_head.safetensors"
TRANSFORMERS_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", HEAD_FILE, NOTE_FILE)
FOLDABLE = ("lora",)  # the methods whose weights fold into the backbone's own
# family -> (config class, model class, prefix of its saved tensors, image processor)
CLASSES = {
    "vit": ("ViTConfig", "ViTForImageClassification", "vit.", "ViTImageProcessor"),
    "dinov2": ("Dinov2Config", "Dinov2ForImageClassification", "dinov2.", "BitImageProcessor"),
    "dinov2_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersForImageClassification",
                         "dinov2_with_registers.", "BitImageProcessor"),
    "clip": ("CLIPVisionConfig", "CLIPVisionModel", "vision_model.", "CLIPImageProcessor"),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel", "vision_model.", "SiglipImageProcessor"),
}
# PIL's bicubic filter, as processor configs number it: tieta resizes images bicubically
# random images the written folder is checked on
CHECK_IMAGES = 2


def check_methods(methods: list[str]) -> None:
    """Refuse a run whose methods transformers cannot run (one sentence)."""
    others = [name for name in methods if name not in FOLDABLE]
    if others:
        raise TietaError(f"export --format transformers is for LoRA-only models: {', '.join(others)} changes the "
                         "computation transformers runs (token reduction drops or merges tokens; adapters add "
                         "branches that cannot be folded into the weights); use tieta export without --format")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise TietaError("export --format transformers needs transformers: pip install 'tieta[transformers]'") from None
    return transformers


def _activation(model: VisionTransformer) -> str:
    act = model.blocks[0].mlp.act
    name = type(act).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    # torch's nn.GELU, or timm's own GELU / GELUTanh modules (the same functions)
    if name == "GELUTanh" or (name == "GELU" and getattr(act, "approximate", "none") == "tanh"):
        return "gelu_pytorch_tanh"
    if name == "GELU":
        return "gelu"
    raise TietaError(f"the model's MLP activation {name} has no counterpart in transformers' ViT models")


def _family(model: nn.Module) -> str:
    """Which transformers model has ``model``'s layout (a key of CLASSES), or a sentence why none."""
    # tieta's methods swap the class for a subclass of timm's; a distilled ViT is one too, with a second token
    if not isinstance(model, VisionTransformer) or getattr(model, "dist_token", None) is not None:
        raise TietaError(f"export --format transformers takes timm's VisionTransformer, not {type(model).__name__}")
    block = model.blocks[0]
    problems = [
        (not isinstance(block.attn.q_norm, nn.Identity), "q/k normalisation"),
        (not isinstance(model.fc_norm, nn.Identity), "a norm after pooling"),
        (not isinstance(model.norm, nn.LayerNorm), "a final norm other than LayerNorm"),
        (model.attn_pool is None and model.global_pool != "token", f"{model.global_pool!r} pooling"),
        (model.attn_pool is not None and model.has_class_token, "attention pooling beside a class token"),
        (getattr(block.mlp, "fc1", None) is None, "a gated MLP"),
    ]
    found = [what for bad, what in problems if bad]
    if found:
        raise TietaError(f"the model has {found[0]}, which none of transformers' ViT, DINOv2, CLIP or SigLIP "
                         "models has; export --format transformers is for those layouts")
    has_bias = model.patch_embed.proj.bias is not None
    if model.attn_pool is not None:
        return "siglip"
    if not isinstance(model.norm_pre, nn.Identity):
        if has_bias:
            raise TietaError("the model has a norm before its blocks and a patch bias, a layout transformers' CLIP "
                             "lacks")
        return "clip"
    layer_scale = not isinstance(block.ls1, nn.Identity)
    if model.no_embed_class and not model.num_reg_tokens:
        raise TietaError("the model's class token has no position embedding, which transformers' ViT lacks")
    if model.num_reg_tokens and not (layer_scale and model.no_embed_class):
        raise TietaError("the model has register tokens outside DINOv2's layout, which transformers lacks")
    if layer_scale:
        return "dinov2_registers" if model.num_reg_tokens else "dinov2"
    return "vit"


def _settings(model: VisionTransformer, family: str, num_classes: int,
              class_names: Optional[list[str]]) -> dict[str, Any]:
    """The transformers config of ``model`` (the image tower's settings, plus labels for a classifier)."""
    block = model.blocks[0]
    width, hidden = model.embed_dim, block.mlp.fc1.out_features
    size, patch = tuple(model.patch_embed.img_size), tuple(model.patch_embed.patch_size)
    settings: dict[str, Any] = dict(
        hidden_size=width, num_hidden_layers=len(model.blocks), num_attention_heads=block.attn.num_heads,
        hidden_act=_activation(model), layer_norm_eps=model.norm.eps,
        image_size=size[0] if size[0] == size[1] else list(size),  # a number where square, as transformers writes
        patch_size=patch[0] if patch[0] == patch[1] else list(patch),
        num_channels=model.patch_embed.proj.in_channels)
    if family.startswith("dinov2"):
        ratio = hidden / width
        settings.update(mlp_ratio=int(ratio) if ratio.is_integer() else ratio,
                        qkv_bias=block.attn.qkv.bias is not None, layerscale_value=1.0)
        if family == "dinov2_registers":
            settings["num_register_tokens"] = model.num_reg_tokens
    else:
        settings["intermediate_size"] = hidden
    if family == "vit":
        settings["qkv_bias"] = block.attn.qkv.bias is not None
    if family == "siglip":
        settings["vision_use_head"] = True
    if family in ("vit", "dinov2", "dinov2_registers"):
        names = class_names or [f"LABEL_{i}" for i in range(num_classes)]
        settings.update(id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)})
    return settings


def _tensors(model: VisionTransformer, family: str, settings: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's tensors under transformers' names, the head as the classifier where it is one."""
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    if any("lora" in name for name in state):
        raise TietaError("the model still holds LoRA tensors; fold them first (tieta.merge_lora)")
    arch = Architecture(family.replace("_registers", ""), family, {**settings, "vision_use_head": True,
                                                                   "num_register_tokens": model.num_reg_tokens})
    converted = from_timm(arch, state, CLASSES[family][2])
    weight, bias = state["head.weight"], state["head.bias"]
    if family == "vit":
        converted.update({"classifier.weight": weight, "classifier.bias": bias})
    elif family.startswith("dinov2"):  # its classifier reads [class token, mean of the patch tokens]
        converted.update({"classifier.weight": torch.cat([weight, torch.zeros_like(weight)], dim=1),
                          "classifier.bias": bias})
    return {name: tensor.contiguous() for name, tensor in converted.items()}


def _processor(family: str, img_size: int, normalization: str | dict[str, Any]) -> dict[str, Any]:
    """The image processor's settings: the run's input size, normalisation and resize filter (PIL's
    number for it, as transformers stores ``resample``)."""
    mean, std = normalization_numbers(normalization)
    interpolation = normalization.get("interpolation", "bicubic") if isinstance(normalization, dict) else "bicubic"
    return {"image_processor_type": CLASSES[family][3], "do_resize": True,
            "size": {"height": img_size, "width": img_size}, "resample": int(INTERPOLATIONS[interpolation]), "do_center_crop": False,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean),
            "image_std": list(std), "do_convert_rgb": True}


def write_transformers(model: nn.Module, methods: list[str], num_classes: int, normalization: str | dict[str, Any],
                       class_names: Optional[list[str]], folder: Path, source_run: str) -> dict[str, Any]:
    """Write ``model`` (LoRA folded, in eval mode) into ``folder`` as a transformers model, and check
    that transformers loads it and computes its logits.

    Returns:
        {"transformers_class": the class that loads it, "max_difference": the largest logit
         difference from tieta's model on random images, "note": how to read the logits}.
    """
    check_methods(methods)
    transformers = _transformers()
    family = _family(model)
    config_name, class_name, _, _ = CLASSES[family]
    settings = _settings(model, family, num_classes, class_names)
    try:
        config = getattr(transformers, config_name)(**settings)
    except Exception as error:  # a setting this transformers version validates otherwise
        raise TietaError(f"transformers' {config_name} does not take the model's settings: "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    config.architectures = [class_name]
    write_file(folder / "config.json", config.to_json_string(use_diff=False))
    write_file(folder / "model.safetensors", save(_tensors(model, family, settings), metadata={"format": "pt"}))
    img_size = model.patch_embed.img_size[0]
    write_file(folder / "preprocessor_config.json", json.dumps(_processor(family, img_size, normalization),
                                                               indent=2) + "\n")
    head = family in ("clip", "siglip")
    if head:
        write_file(folder / HEAD_FILE, save({"weight": model.head.weight.detach().cpu().contiguous(),
                                             "bias": model.head.bias.detach().cpu().contiguous()},
                                            metadata={"format": "pt"}))
    note = (f"{class_name}.from_pretrained(folder)(pixel_values).pooler_output @ weight.T + bias, with weight and "
            f"bias from {HEAD_FILE}" if head else f"{class_name}.from_pretrained(folder)(pixel_values).logits")
    difference = _check(transformers, class_name, folder, model, head, img_size)
    write_file(folder / NOTE_FILE, json.dumps({
        "format": "transformers", "transformers_class": class_name, "logits": note, "source_run": source_run,
        "tieta_version": tieta.__version__, "img_size": img_size, "normalization": normalization,
        "max_difference": difference}, indent=2) + "\n")
    return {"transformers_class": class_name, "max_difference": difference, "note": note}


def _check(transformers, class_name: str, folder: Path, model: nn.Module, head: bool, img_size: int) -> float:
    """The largest logit difference between transformers' model loaded from ``folder`` and ``model``
    on random images; every tensor must load (a missing or unexpected one is refused)."""
    transformers.utils.logging.disable_progress_bar()
    loaded, info = getattr(transformers, class_name).from_pretrained(folder, output_loading_info=True)
    gaps = [*info.get("missing_keys", ()), *info.get("unexpected_keys", ()), *info.get("mismatched_keys", ())]
    if gaps:
        raise TietaError(f"transformers' {class_name} does not take the converted tensors "
                         f"({', '.join(map(str, gaps[:3]))}); nothing was exported")
    images = torch.randn(CHECK_IMAGES, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    loaded.eval()
    with torch.no_grad():
        expected = model.cpu()(images)
        found = loaded(pixel_values=images)
        logits = model.head(found.pooler_output) if head else found.logits
    return float((logits - expected).abs().max())

"""A ``transformers`` checkpoint as a timm ``VisionTransformer`` with a fresh head.

The architecture comes from the checkpoint's config.json (no timm model name is needed); the
tensors are renamed to timm's, the position embeddings resampled to the requested input size, and
every tensor but the classifier loaded strictly. The converted model computes what transformers'
own forward computes: ``forward_features`` is ViT's and DINOv2's ``last_hidden_state`` (CLIP's
after its ``post_layernorm``, which timm applies to every token), ``forward_head(...,
pre_logits=True)`` is the pooled output where the family has one (CLIP's and SigLIP's
``pooler_output``, DINOv2's class token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from torch import nn

from tieta.errors import TietaError
from tieta.hf import convert, preprocess, source


def load_hf_backbone(weights: Union[str, Path], num_classes: int, img_size: Optional[int] = None,
                     random_weights: bool = False, **timm_kwargs) -> nn.Module:
    """The timm ViT of the transformers checkpoint ``weights`` (a save_pretrained folder or
    ``hf:ORG/NAME``), with a fresh head for ``num_classes``.

    Args:
        img_size: input resolution; position embeddings are resampled to it (None: the checkpoint's).
        random_weights: build the architecture only (config.json is read, the weights are not).
        **timm_kwargs: passed to timm's ``VisionTransformer`` (e.g. ``drop_path_rate``).

    Returns:
        The model in train mode, on the CPU, its ``pretrained_cfg`` giving the processor's mean, std,
        interpolation and crop.
    """
    folder = source.resolve(weights)
    where = str(folder / source.CONFIG_FILE)
    arch = convert.architecture(source.read_config(folder), where)
    try:
        model = convert.build(arch, num_classes, img_size, **timm_kwargs)
    except (TypeError, ValueError, AssertionError) as error:
        raise TietaError(f"timm could not build the ViT that {where} describes: {error}") from error
    _check_patch_grid(model, img_size, where)
    model.pretrained_cfg = {
        **preprocess.pretrained_cfg(arch.family, source.read_preprocessor(folder),
                                    str(folder / source.PREPROCESSOR_FILE)),
        "architecture": f"transformers {arch.model_type}", "num_classes": num_classes,
        "input_size": (3, *model.patch_embed.img_size), "source": str(weights)}
    if random_weights:
        return model
    tensors = convert.to_timm(arch, source.read_tensors(folder), model, str(folder))
    head = {name for name in model.state_dict() if name.split(".")[0] == "head"}
    missing = sorted(set(model.state_dict()) - head - set(tensors))
    if missing:  # every tensor but the head is converted: a gap here is tieta's, named all the same
        raise TietaError(f"{folder} gives no tensor for {', '.join(missing[:3])} of the converted model")
    model.load_state_dict(tensors, strict=False)
    return model


def _check_patch_grid(model: nn.Module, img_size: Optional[int], where: str) -> None:
    patch = tuple(model.patch_embed.patch_size)
    if img_size is not None and any(img_size % side for side in patch):
        raise TietaError(f"img_size {img_size} is not a multiple of the patch size {patch[0]} of the model "
                         f"{where} describes")

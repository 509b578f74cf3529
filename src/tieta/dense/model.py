"""The segmentation model: a ViT (any of tieta's methods attached), DyT's multi-scale neck, a
UPerNet head and the auxiliary FCN head, as mmseg's ``EncoderDecoder`` runs them in DyT's
segmentation code.

    images (B, 3, H, W)
      -> the blocks' patch grids (tieta.dense.neck.block_grids)       4 x (B, C, H/P, W/P)
      -> the neck                                                     (B, C, 4H/P, ..), (2H/P), (H/P), (H/2P)
      -> UPerNet -> (B, classes, 4H/P, 4W/P)   (1/4 of the input at patch 16)
      -> bilinear, align_corners False, to (B, classes, H, W)          ``forward``
      the FCN head on the third scale -> (B, classes, H/P, W/P)        training only (``heads``)

The neck and both heads are one module, ``head`` (:class:`SegmentationHead`), so that they are in
the head's parameter group (``tieta.methods.params``): trained, at the base learning rate unless
``optim.lr_groups.head`` says otherwise, as DyT's code trains every new module, and saved in every
checkpoint. The backbone's classifier is removed (pixels are classified by the heads); its frozen
or trainable split stays its methods' own.

Evaluation as mmseg's: :func:`whole_inference` (the image at once) or :func:`slide_inference`
(overlapping crops, their logits summed and divided by how many crops cover each pixel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tieta.dense.config import is_segmentation
from tieta.dense.neck import MultiScaleNeck, block_grids, feature_indices
from tieta.dense.uperhead import POOL_SCALES, FCNHead, UPerHead, resize
from tieta.errors import TietaError
from tieta.methods import registry
from tieta.methods.state import share_state

IGNORE_INDEX = 255  # ADE20K's label for pixels no class is scored on (after reduce_zero_label)
AUX_WEIGHT = 0.4  # the auxiliary head's share of the loss (DyT's and mmseg's UPerNet configs)


class SegmentationHead(nn.Module):
    """The neck and the two heads (``neck``, ``decode_head``, ``auxiliary_head``)."""

    def __init__(self, neck: MultiScaleNeck, decode_head: UPerHead, auxiliary_head: Optional[FCNHead]) -> None:
        super().__init__()
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head


@dataclass
class SegmentationOutputs:
    """One training pass: the heads' logits at their own resolution (the loss resizes them).

    Attributes:
        logits: (B, classes, h, w) of UPerNet, 1/4 of the input at patch 16.
        aux_logits: (B, classes, h', w') of the FCN head, None without one.
    """

    logits: torch.Tensor
    aux_logits: Optional[torch.Tensor]


class SegmentationModel(nn.Module):
    """A timm ViT with tieta's methods, as a semantic segmentation model.

    Args:
        backbone: a timm VisionTransformer or Eva (methods attached already); its classifier is
            removed (``reset_classifier(0)``).
        classes: the classes every pixel is scored on.
        channels: UPerNet's width (DyT's config: 768).
        aux_channels: the FCN head's width (256); 0: no auxiliary head.
        indices: the four blocks the neck reads; None: 3, 5, 7, 11 of 12 at the same fractions of
            the depth (:func:`tieta.dense.neck.feature_indices`).
        neck_norm: BEiT's BatchNorm in the neck (DyT's code has none).
        pool_scales, dropout, align_corners: UPerNet's (and the heads' resizes).
        aux_weight, ignore_index: the loss's (:func:`segmentation_step` reads them here).

    Attributes:
        backbone: the ViT; head: :class:`SegmentationHead`; indices: the blocks read; classes.
    """

    def __init__(self, backbone: nn.Module, classes: int, channels: int = 768, aux_channels: int = 256,
                 indices: Optional[Sequence[int]] = None, neck_norm: bool = False,
                 pool_scales: Sequence[int] = POOL_SCALES, dropout: float = 0.1, align_corners: bool = False,
                 aux_weight: float = AUX_WEIGHT, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        if not hasattr(backbone, "forward_intermediates") or not hasattr(backbone, "blocks"):
            raise TietaError(f"a segmentation model needs a timm ViT with forward_intermediates, got "
                             f"{type(backbone).__name__}")
        if type(classes) is not int or classes < 1 or type(channels) is not int or channels < 1:
            raise TietaError(f"classes and channels must be whole numbers of at least 1, got {classes!r} and "
                             f"{channels!r}")
        if type(aux_channels) is not int or aux_channels < 0:
            raise TietaError(f"aux_channels must be a whole number (0: no auxiliary head), got {aux_channels!r}")
        self.indices = feature_indices(len(backbone.blocks), indices)
        self.classes = classes
        self.align_corners = align_corners
        self.aux_weight, self.ignore_index = aux_weight, ignore_index
        backbone.reset_classifier(0)
        self.backbone = backbone
        # the preprocessing the backbone was made with (timm's data config; tieta's normalisation "model")
        self.pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
        self.share_state()
        width = backbone.embed_dim
        auxiliary = FCNHead(width, aux_channels, classes, index=2, dropout=dropout) if aux_channels else None
        self.head = SegmentationHead(MultiScaleNeck(width, norm=neck_norm),
                                     UPerHead([width] * 4, channels, classes, pool_scales, dropout, align_corners),
                                     auxiliary)

    def share_state(self) -> None:
        """Let tieta's accessors of a method's state (``activation_rates``, a method's ``measure``)
        find the backbone's on this model: both hold the one object (a method attached to the
        backbone after wrapping is seen from the next forward pass on)."""
        share_state(self, self.backbone)

    def no_weight_decay(self) -> set[str]:
        """The backbone's own no-decay names (``pos_embed``, ``cls_token``...), as named here."""
        skip = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{name}" for name in skip()} if callable(skip) else set()

    @property
    def patch_embed(self) -> nn.Module:
        """The backbone's patch embedding (its input size: what the model takes)."""
        return self.backbone.patch_embed

    def scales(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The neck's four scales. Args: images: (B, 3, H, W). Returns: (B, C, 4h, 4w) .. (B, C, h/2, w/2)."""
        self.share_state()
        return self.head.neck(block_grids(self.backbone, images, self.indices))

    def heads(self, images: torch.Tensor) -> SegmentationOutputs:
        """Both heads' logits at their own resolution (the training pass; the auxiliary head only
        in training mode, as mmseg runs it)."""
        scales = self.scales(images)
        aux = self.head.auxiliary_head
        return SegmentationOutputs(self.head.decode_head(scales),
                                   aux(scales) if aux is not None and self.training else None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """mmseg's ``encode_decode``. Args: images: (B, 3, H, W). Returns: (B, classes, H, W) logits."""
        logits = self.head.decode_head(self.scales(images))
        return resize(logits, images.shape[2:], self.align_corners)


def pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                        align_corners: bool = False) -> torch.Tensor:
    """mmseg's decode-head loss: the logits resized (bilinear) to the labels, the per-pixel
    cross-entropy, pixels labelled ``ignore_index`` counting 0, averaged over every pixel (ignored
    ones too: mmseg's ``CrossEntropyLoss`` reduces by ``mean()``, where torch's ``ignore_index``
    mean would divide by the pixels scored).

    Args: logits: (B, K, h, w); labels: (B, H, W) class indices (int64).
    """
    logits = resize(logits, labels.shape[-2:], align_corners)
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none").mean()


def segmentation_loss(outputs: SegmentationOutputs, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                      aux_weight: float = AUX_WEIGHT, align_corners: bool = False) -> torch.Tensor:
    """``CE(UPerNet) + aux_weight CE(FCN)``, each as :func:`pixel_cross_entropy`."""
    loss = pixel_cross_entropy(outputs.logits, labels, ignore_index, align_corners)
    if outputs.aux_logits is not None:
        loss = loss + aux_weight * pixel_cross_entropy(outputs.aux_logits, labels, ignore_index, align_corners)
    return loss


def method_losses(backbone: nn.Module) -> Optional[torch.Tensor]:
    """The attached methods' own terms of a dense task's loss, from the pass just run
    (``Method.dense_loss``: DyT's token rate, ``2 (mean(mask) - rho)^2`` over every image,
    dispatcher and patch token, as its segmentation code adds it); None where no method has one."""
    terms = [term for method in registry.methods().values() if method.dense_loss is not None
             if (term := method.dense_loss(backbone)) is not None]
    return sum(terms[1:], terms[0]) if terms else None


def segmentation_step(model: SegmentationModel, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One training step's loss as DyT's segmentation code computes it: the heads' losses
    (:func:`segmentation_loss`), plus the attached methods' own terms (:func:`method_losses`).

    Args: images: (B, 3, H, W); labels: (B, H, W) int64, the model's ``ignore_index`` where unscored.
    """
    loss = segmentation_loss(model.heads(images), labels, model.ignore_index, model.aux_weight, model.align_corners)
    own = method_losses(model.backbone)
    return loss if own is None else loss + own


def _window_count(side: int, crop: int, stride: int) -> int:
    return max(side - crop + stride - 1, 0) // stride + 1


@torch.no_grad()
def slide_inference(model: nn.Module, images: torch.Tensor, crop: int | tuple[int, int],
                    stride: int | tuple[int, int], classes: Optional[int] = None) -> torch.Tensor:
    """mmseg's sliding-window evaluation: crops of ``crop`` every ``stride`` pixels (the last row
    and column of crops moved back to end at the image's edge), each crop's logits added in place,
    every pixel's sum divided by the crops that cover it. A side shorter than the crop is taken
    whole (the model must accept that size).

    Args:
        model: images (B, 3, h, w) -> logits (B, K, h, w), e.g. a :class:`SegmentationModel`.
        images: (B, 3, H, W).
        crop, stride: pixels, one number or (height, width); DyT's ADE20K setting: 512 and 341.
        classes: K; None: the model's ``classes``.

    Returns: (B, K, H, W) averaged logits.
    """
    (crop_h, crop_w), (stride_h, stride_w) = _pair(crop, "crop"), _pair(stride, "stride")
    if stride_h > crop_h or stride_w > crop_w:
        raise TietaError(f"a stride ({stride_h}x{stride_w}) longer than the crop ({crop_h}x{crop_w}) leaves pixels no "
                         "crop covers")
    classes = classes if classes is not None else getattr(model, "classes", None)
    if classes is None:
        raise TietaError("give slide_inference the number of classes (the model does not say)")
    batch, _, height, width = images.shape
    preds = images.new_zeros((batch, classes, height, width))
    count = images.new_zeros((batch, 1, height, width))
    for row in range(_window_count(height, crop_h, stride_h)):
        for column in range(_window_count(width, crop_w, stride_w)):
            y2, x2 = min(row * stride_h + crop_h, height), min(column * stride_w + crop_w, width)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            preds[:, :, y1:y2, x1:x2] += model(images[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


@torch.no_grad()
def whole_inference(model: nn.Module, images: torch.Tensor, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """mmseg's whole-image evaluation: the model's logits, resized (bilinear, align_corners False)
    to ``size`` (the image's original size) where given. Returns: (B, K, H, W)."""
    logits = model(images)
    return logits if size is None else resize(logits, size, getattr(model, "align_corners", False))


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if type(value) is int else tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(type(side) is int and side >= 1 for side in pair):
        raise TietaError(f"slide_inference's {name} is pixels, a whole number of at least 1 or (height, width), "
                         f"got {value!r}")
    return pair


def segmentation_model_for(model: nn.Module, config, num_classes: int) -> nn.Module:
    """The segmentation model around ``model`` (its methods attached) where the run's settings ask
    for one (``segmentation.head``), else ``model`` itself."""
    if not is_segmentation(config):
        return model
    section = config.segmentation
    return SegmentationModel(model, num_classes, channels=section.channels, aux_channels=section.aux_channels,
                             indices=section.indices, neck_norm=section.neck_norm, aux_weight=section.aux_weight,
                             ignore_index=section.ignore_index)

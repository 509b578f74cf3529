"""Hugging Face ``transformers`` checkpoints as timm backbones, and trained models back to ``transformers``.

- ``source.py``: where a checkpoint is (a ``save_pretrained`` folder or ``hf:ORG/NAME``), its
  config and tensors, and :func:`describe`, the record of what was loaded;
- ``convert.py``: each supported family's config as timm ``VisionTransformer`` arguments and its
  tensors under timm's names;
- ``preprocess.py``: the processor's normalisation and resizing as timm's ``pretrained_cfg``;
- ``load.py``: the converted timm model (``tieta.load_backbone`` calls it);
- ``export.py``: ``tieta export --format transformers``.

Reading a checkpoint needs neither ``transformers`` nor its code: config.json is JSON and the
weights are safetensors (or ``torch.load(weights_only=True)``). Only the export imports
``transformers``, to check that it loads what was written.
"""

from tieta.hf.source import describe

__all__ = ["describe"]

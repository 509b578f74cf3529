"""The reference codes ``tieta import`` reads, as the command line names them (no torch needed,
so that ``tieta import --help`` and its argument errors stay fast)."""

from __future__ import annotations

# --from NAME: whose published code saved the checkpoint
CODES = ("pyra", "dyt", "noah")

SUMMARY = "turn a PYRA, DyT or NOAH reference-code checkpoint into a run folder"
DESCRIPTION = ("Convert a checkpoint saved by the public PYRA, DyT or NOAH code into a finished run folder (its "
               "backbone in backbone.safetensors, the trained tensors in checkpoint.safetensors), which tieta eval, "
               "export and predict read. Nothing in the file is executed: .pth files are read with "
               "torch.load(weights_only=True).")
FROM_HELP = "whose code wrote it: pyra (PYRA/ToMe + LoRA), dyt (DyT), noah (NOAH's LoRA)"
SCHEDULE_HELP = ("PYRA-code checkpoints without PYRA modules: the ToMe schedule they were trained with (low, high, "
                 "a list like [16,16,8]) or none")

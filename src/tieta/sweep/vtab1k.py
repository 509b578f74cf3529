"""The 19 VTAB-1k tasks: their folder names in the public release, class counts and groups.

Folder names and class counts are those of the release that the NOAH, VPT, PYRA and DyT code
reads (``<root>/<name>/train800val200.txt``, ...). The papers' headline number is the mean of the
three group means; the mean over the 19 tasks is also common.
"""

from __future__ import annotations

GROUPS = ("natural", "specialized", "structured")

# folder name -> (group, number of classes)
VTAB_1K: dict[str, tuple[str, int]] = {
    "cifar": ("natural", 100),
    "caltech101": ("natural", 102),
    "dtd": ("natural", 47),
    "oxford_flowers102": ("natural", 102),
    "oxford_iiit_pet": ("natural", 37),
    "svhn": ("natural", 10),
    "sun397": ("natural", 397),
    "patch_camelyon": ("specialized", 2),
    "eurosat": ("specialized", 10),
    "resisc45": ("specialized", 45),
    "diabetic_retinopathy": ("specialized", 5),
    "clevr_count": ("structured", 8),
    "clevr_dist": ("structured", 6),
    "dmlab": ("structured", 6),
    "kitti": ("structured", 4),
    "dsprites_loc": ("structured", 16),
    "dsprites_ori": ("structured", 16),
    "smallnorb_azi": ("structured", 18),
    "smallnorb_ele": ("structured", 9),
}

"""Every method tieta knows, one entry each: the one list that training, config, the command line,
reports, FLOP counting, deploy and ``tieta``'s public verbs read.

An entry is readable without torch (``tieta --help`` and argument errors are answered from the
entries alone): the method's name, the module that defines its working parts (its ``METHOD``, a
``tieta.methods.method.Method``), its one-line summary, its command-line flags and its public
Python verbs (``tieta.add_lora`` ...). ``METHODS`` imports the modules on first use. Adding a method
is its module and one entry here (see ``docs/adding-a-method.md``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from tieta.errors import TietaError
from tieta.methods.catalog import (DYT_VARIANTS, SCHEDULE_FLAG, Flag, parse_keep_rates, parse_layer_flag,
                                   parse_number_or_name)
from tieta.ops.diffrate_rates import PUBLISHED_RATES

if TYPE_CHECKING:  # the modules, and torch with them, are imported only when METHODS is read
    from tieta.methods.method import Method


@dataclass(frozen=True)
class Entry:
    """One method, as the registry lists it (no torch needed to read it).

    Attributes:
        name: what ``--method`` calls it (joined with "+" to combine, e.g. "pyra+lora"); the
            module's ``METHOD.name`` must be the same.
        module: the module whose ``METHOD`` holds its working parts, e.g. "tieta.methods.lora".
        summary: one line for listings.
        flags: command-line flags for its most used settings (their parse functions need no torch).
        verbs: the public Python names of ``module`` that ``tieta`` re-exports, e.g.
            ("add_lora", "merge_lora").
    """

    name: str
    module: str
    summary: str
    flags: tuple[Flag, ...] = ()
    verbs: tuple[str, ...] = ()


ENTRIES: tuple[Entry, ...] = (
    Entry("lora", "tieta.methods.lora",
          "LoRA on every block's qkv projection (NOAH/PYRA style, or per q/k/v with alpha)",
          flags=(Flag("--lora-rank", "lora.rank", int, "LoRA rank (default 8)"),),
          verbs=("add_lora", "merge_lora")),
    Entry("adapter", "tieta.methods.adapter",
          "AdaptFormer: a bottleneck MLP parallel to every block's MLP",
          flags=(Flag("--adapter-dim", "adapter.dim", int, "adapter bottleneck width (default 8)"),),
          verbs=("add_adapter",)),
    Entry("tome", "tieta.methods.tome",
          "ToMe: merge r similar tokens in every block (Bolya et al., ICLR 2023)",
          flags=(SCHEDULE_FLAG,),
          verbs=("add_tome",)),
    Entry("pyra", "tieta.methods.pyra",
          "PYRA: ToMe with trainable re-activation of the merged tokens (Xiong et al., ECCV 2024)",
          flags=(SCHEDULE_FLAG, Flag("--pyra-lr", "pyra.lr", parse_number_or_name,
                                     "PYRA's lr: reference (the base lr, as the published runs), paper (1e-4) or a "
                                     "number")),
          verbs=("add_pyra",)),
    Entry("dyt", "tieta.methods.dyt",
          "DyT: token dispatchers skip the MLP (or attention, or the block) for inactive tokens "
          "(Zhao et al., NeurIPS 2024)",
          flags=(Flag("--rho", "dyt.rho", float, "DyT: target share of active tokens (default 0.5)"),
                 Flag("--dyt-variant", "dyt.variant", str, "DyT: what inactive tokens skip (default mlp)",
                      DYT_VARIANTS),
                 Flag("--experts", "dyt.experts", int, "DyT: adapter experts; > 1 makes an MoE-adapter (default 1)")),
          verbs=("add_dyt", "dyt_loss", "dyt_forward", "activation_rates")),
    Entry("evit", "tieta.methods.evit",
          "EViT: keep the tokens the class token attends to, fuse the rest (Liang et al., ICLR 2022)",
          flags=(Flag("--keep-rate", "evit.keep_rate", float,
                      "EViT: share of tokens kept at each location (default 0.7)"),),
          verbs=("add_evit",)),
    Entry("dynamicvit", "tieta.methods.dynamicvit",
          "DynamicViT: learned prediction modules prune tokens before a few blocks (Rao et al., NeurIPS 2021)",
          verbs=("add_dynamicvit", "dynamicvit_loss")),
    Entry("diffrate", "tieta.methods.diffrate",
          "DiffRate: searched per-block prune and merge rates (Chen et al., ICCV 2023)",
          flags=(Flag("--diffrate-rates", "diffrate.rates", str, "DiffRate: a published schedule, e.g. vit_b_deit_8.7",
                      tuple(PUBLISHED_RATES)),
                 Flag("--target-gmacs", "diffrate.target_gmacs", float,
                      "DiffRate: search the rates for this many GMACs per image in the first diffrate.search_epochs "
                      "epochs")),
          verbs=("add_diffrate", "search_rates")),
    Entry("spvit", "tieta.methods.spvit",
          "SPViT: multi-head token selectors fold pruned tokens into package tokens (Kong et al., ECCV 2022)",
          flags=(Flag("--spvit-keep-rate", "spvit.keep_rate", parse_keep_rates,
                      "SPViT: per-stage share of the patch tokens kept, e.g. [0.617,0.369,0.137] (the default)"),),
          verbs=("add_spvit", "spvit_loss")),
    Entry("fpet", "tieta.methods.fpet",
          "FPET: a learned checkerboard merge halves the patch tokens in one block (Kim et al., CVPR 2025)",
          flags=(Flag("--fpet-layer", "fpet.layers", parse_layer_flag,
                      "FPET: the block that merges (default 6 of 12, the same fraction of depth elsewhere)"),),
          verbs=("add_fpet",)),
    Entry("tofu", "tieta.methods.tofu",
          "ToFu: ToMe's matching prunes in early blocks, fuses by a norm-preserving mean later (Kim et al., WACV 2024)",
          flags=(SCHEDULE_FLAG,),
          verbs=("add_tofu",)),
    Entry("pitome", "tieta.methods.pitome",
          "PiToMe: merge tokens ranked by an energy score, protecting the informative ones (Tran et al., NeurIPS 2024)",
          flags=(Flag("--pitome-ratio", "pitome.ratio", float,
                      "PiToMe: share of tokens each block keeps (default 0.9125)"),),
          verbs=("add_pitome",)),
    Entry("mctf", "tieta.methods.mctf",
          "MCTF: fuse tokens by similarity, informativeness and size, with one-step-ahead attention "
          "(Lee et al., CVPR 2024)",
          flags=(Flag("--mctf-r", "mctf.r", float, "MCTF: tokens fused per block, or a share below 1 (default 16)"),),
          verbs=("add_mctf",)),
    Entry("dtem", "tieta.methods.dtem",
          "DTEM: merge r tokens per block by a learned, decoupled embedding (Lee & Hong, NeurIPS 2024)",
          flags=(Flag("--dtem-r", "dtem.r", int, "DTEM: tokens merged away in every block (default 16)"),),
          verbs=("add_dtem",)),
    Entry("atc", "tieta.methods.atc",
          "ATC: agglomerative clustering of the patch tokens at a few blocks (Haurum et al., ECCV 2024)",
          flags=(Flag("--atc-keep-rate", "atc.keep_rate", float,
                      "ATC: share of the patch tokens kept per location, compounding (default 0.7)"),
                 Flag("--linkage", "atc.linkage", str, "ATC: how cluster distances combine (default average)",
                      ("single", "complete", "average"))),
          verbs=("add_atc",)),
)


def names() -> list[str]:
    """Every method's name, in the registry's order (no module is imported)."""
    return [entry.name for entry in ENTRIES]


def flags() -> list[Flag]:
    """Every method's command-line flags, each once (methods may share one, as ToMe and PYRA do);
    no module is imported."""
    seen: dict[str, Flag] = {}
    for entry in ENTRIES:
        for flag in entry.flags:
            seen.setdefault(flag.option, flag)
    return list(seen.values())


def verbs() -> dict[str, str]:
    """Public verb -> the module that defines it, for every method (no module is imported)."""
    return {verb: entry.module for entry in ENTRIES for verb in entry.verbs}


@functools.lru_cache(maxsize=None)
def method_of(entry: Entry) -> "Method":
    """The entry's method: its module's ``METHOD`` (the working parts) with the entry's summary,
    flags and verbs. The module is imported here, on first use."""
    parts = importlib.import_module(entry.module).METHOD
    if parts.name != entry.name:
        raise TypeError(f"{entry.module}.METHOD is named {parts.name!r}, but its registry entry {entry.name!r}")
    return dataclasses.replace(parts, summary=entry.summary, flags=entry.flags, verbs=entry.verbs)


def methods() -> dict[str, "Method"]:
    """name -> Method, for every entry, in the registry's order (imports the method modules)."""
    return {entry.name: method_of(entry) for entry in ENTRIES}


def __getattr__(name: str) -> Any:
    # METHODS is read afresh from ENTRIES (each module imported once), so that --help, which reads
    # only the entries, never loads torch
    if name == "METHODS":
        return methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_methods(text: str) -> list["Method"]:
    """"pyra+lora" -> the two methods, in the order named (the order they are attached in)."""
    names_given = [name.strip() for name in text.split("+") if name.strip()]
    if not names_given:
        raise TietaError("method must name at least one method, e.g. 'lora'")
    known = methods()
    for name in names_given:
        if name not in known:
            raise TietaError(f"unknown method {name!r}; choose from {', '.join(known)} (join several with '+')")
    if len(set(names_given)) != len(names_given):
        raise TietaError(f"method {text!r} names a method twice")
    return [known[name] for name in names_given]


def config_sections() -> dict[str, type]:
    """Every method's config sections, each once: section name -> dataclass."""
    sections: dict[str, type] = {}
    for method in methods().values():
        for name, cls in method.sections.items():
            if sections.setdefault(name, cls) is not cls:
                raise TypeError(f"config section {name!r} is declared with two classes")
    return sections


def parameter_group(name: str) -> Optional[str]:
    """The method whose module holds parameter ``name`` (e.g. "blocks.3.attn.qkv.lora_A" -> "lora"),
    or None."""
    group_of_module = {module: method.name for method in methods().values() for module in method.modules}
    for part in name.split("."):
        group = group_of_module.get(part)
        if group is not None:
            return group
    return None

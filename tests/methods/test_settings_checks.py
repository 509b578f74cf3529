"""Each method's settings are checked in one place, its config dataclass's ``check``: the ``add_*``
verb builds the config from its arguments and checks it, and so does the run config's validation,
with the same sentence, each naming the fields as its user wrote them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import tieta
from tieta.errors import TietaError
from tieta.methods.atc import METHOD as ATC, ATCConfig
from tieta.methods.diffrate import METHOD as DIFFRATE, DiffRateConfig
from tieta.methods.dtem import METHOD as DTEM, DTEMConfig
from tieta.methods.dyt import METHOD as DYT, DyTConfig
from tieta.methods.evit import METHOD as EVIT, EViTConfig
from tieta.methods.fpet import METHOD as FPET, FPETConfig
from tieta.methods.lora import METHOD as LORA, LoRAConfig
from tieta.methods.mctf import METHOD as MCTF, MCTFConfig
from tieta.methods.pitome import METHOD as PITOME, PiToMeConfig
from tieta.methods.spvit import METHOD as SPVIT, SPViTConfig
from tests.conftest import make_vit

# (the verb's call, the method, its section with the same setting, the verb's prefix, the sentence after it)
CASES = [
    (lambda m: tieta.add_evit(m, keep_rate=2), EVIT, "evit", EViTConfig(keep_rate=2), "",
     "keep_rate must be in (0, 1], got 2"),
    (lambda m: tieta.add_lora(m, rank=0), LORA, "lora", LoRAConfig(rank=0), "LoRA ",
     "rank must be a positive integer, got 0"),
    (lambda m: tieta.add_lora(m, rank=2, dropout=1.0), LORA, "lora", LoRAConfig(dropout=1.0), "LoRA ",
     "dropout must be in [0, 1), got 1.0"),
    (lambda m: tieta.add_dyt(m, rho=0), DYT, "dyt", DyTConfig(rho=0), "DyT ",
     "rho, the target share of active tokens, must be in (0, 1], got 0"),
    (lambda m: tieta.add_dyt(m, variant="x"), DYT, "dyt", DyTConfig(variant="x"), "DyT ",
     "variant must be one of mlp, attn, attn_mlp, layer, got 'x'"),
    (lambda m: tieta.add_diffrate(m, criterion="keys"), DIFFRATE, "diffrate", DiffRateConfig(criterion="keys"), "",
     "criterion must be one of class, received, got 'keys'"),
    (lambda m: tieta.add_diffrate(m, granularity=0), DIFFRATE, "diffrate", DiffRateConfig(granularity=0), "",
     "granularity must be at least 1"),
    (lambda m: tieta.add_diffrate(m, target_gmacs=-1.0), DIFFRATE, "diffrate", DiffRateConfig(target_gmacs=-1.0), "",
     "target_gmacs must be positive"),
    (lambda m: tieta.add_atc(m, keep_rate=0), ATC, "atc", ATCConfig(keep_rate=0), "",
     "keep_rate must be in (0, 1], got 0"),
    (lambda m: tieta.add_atc(m, linkage="ward"), ATC, "atc", ATCConfig(linkage="ward"), "",
     "linkage must be one of single, complete, average, got 'ward'"),
    (lambda m: tieta.add_atc(m, clusters=[0, 2, 1]), ATC, "atc", ATCConfig(clusters=[0, 2, 1]), "",
     "clusters must be whole numbers of at least 1, got [0, 2, 1]"),
    (lambda m: tieta.add_dtem(m, r=-1), DTEM, "dtem", DTEMConfig(r=-1), "DTEM's ",
     "r is the tokens each block merges and cannot be negative, got -1"),
    (lambda m: tieta.add_dtem(m, candidates=0), DTEM, "dtem", DTEMConfig(candidates=0), "DTEM's ",
     "candidates must be at least 1, got 0"),
    (lambda m: tieta.add_dtem(m, metric_dim=0), DTEM, "dtem", DTEMConfig(metric_dim=0), "DTEM's ",
     "metric_dim must be a whole number >= 1, got 0"),
    (lambda m: tieta.add_mctf(m, r=2.5), MCTF, "mctf", MCTFConfig(r=2.5), "MCTF's ",
     "r must be a whole number of tokens or a share in [0, 1), got 2.5"),
    (lambda m: tieta.add_fpet(m, layers=[1, 2]), FPET, "fpet", FPETConfig(layers=[1, 2]), "FPET's ",
     "layers holds one block at most (FPET merges once: its checkerboard needs the full patch grid), got [1, 2]"),
    (lambda m: tieta.add_fpet(m, refine_bits=4), FPET, "fpet", FPETConfig(refine_bits=4), "FPET's ",
     "refine_bits must be 1 or 32, got 4"),
    (lambda m: tieta.add_fpet(m, refine_dim=0), FPET, "fpet", FPETConfig(refine_dim=0), "FPET's ",
     "refine_dim must be in 1..4096, got 0"),
    (lambda m: tieta.add_spvit(m, keep_rates=[0.5, 0.7]), SPVIT, "spvit", SPViTConfig(keep_rate=[0.5, 0.7]),
     "SPViT's ", "keep_rate is cumulative and cannot grow from one stage to the next, got [0.5, 0.7]"),
    (lambda m: tieta.add_spvit(m, keep_rates=[0.0]), SPVIT, "spvit", SPViTConfig(keep_rate=[0.0]), "SPViT's ",
     "keep_rate must be a list of shares in (0, 1], got [0.0]"),
    (lambda m: tieta.add_spvit(m, decision="x"), SPVIT, "spvit", SPViTConfig(decision="x"), "SPViT's ",
     "decision is one of top_k, argmax, got 'x'"),
    (lambda m: tieta.add_pitome(m, ratio=0.4), PITOME, "pitome", PiToMeConfig(ratio=0.4), "",
     "ratio is the share of tokens each block keeps, in [0.5, 1], got 0.4"),
    (lambda m: tieta.add_pitome(m, alpha=0), PITOME, "pitome", PiToMeConfig(alpha=0), "",
     "alpha is the energy's ELU alpha, a number > 0, got 0"),
    (lambda m: tieta.add_pitome(m, margins=[2, 0, 0]), PITOME, "pitome", PiToMeConfig(margins=[2, 0, 0]), "",
     "margins are cosine similarities, numbers in [-1, 1], got [2, 0, 0]"),
]


@pytest.mark.parametrize("attach,method,section,settings,prefix,sentence", CASES)
def test_the_verb_and_the_run_config_refuse_with_the_same_sentence(attach, method, section, settings, prefix,
                                                                  sentence):
    model = make_vit("plain")
    with pytest.raises(TietaError) as from_verb:
        attach(model)
    assert str(from_verb.value) == prefix + sentence
    assert type(model.blocks[0]).__name__ == "Block"  # refused before anything changed
    config = SimpleNamespace(**{section: settings}, methods=(method.name,), optim=SimpleNamespace(epochs=5))
    with pytest.raises(TietaError) as from_config:
        method.validate(config)
    assert str(from_config.value) == f"{section}.{sentence}"

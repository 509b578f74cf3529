"""tieta plan: the budget's forms, the knob search on counted FLOPs and on timings (a deterministic
rate function, then one real smoke run), a target out of reach, and the sweep file it writes."""

import copy

import pytest
import torch
import yaml

from conftest import refused, write_vtab_task
from tieta.backbone import load_backbone
from tieta.cli import main
from tieta.errors import TietaError
from tieta.measure.flops import count_flops
from tieta.measure.matched import attached_at
from tieta.measure.plan import plan
from tieta.measure.target import Target, parse_target
from tieta.sweep.plan import read_plan
from tieta.sweep.planned import run_name

SIZE = 64  # 4 x 4 patches of test_vit
TINY = ["--model", "test_vit", "--img-size", str(SIZE)]


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return load_backbone("test_vit", weights="random", img_size=SIZE).eval()


def _one():
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def by_cost(noise: float = 0.0):
    """A deterministic timing: each model runs at 1000 / its GMACs calls per second, the rounds
    spread by +-``noise`` (the baseline's the other way), so the search is tested without a clock."""
    def rates(models, progress):
        found = {}
        for index, (name, model) in enumerate(models.items()):
            gmacs = count_flops(model, _one())["gmacs"]
            sign = 1 if index else -1
            found[name] = [1000.0 / gmacs * (1 + sign * noise * k) for k in (-1, 0, 1)]
        return found

    return rates


# --- the target's forms --------------------------------------------------------------------------

@pytest.mark.parametrize("text, kind, value", [
    ("speedup=2", "speedup", 2.0), ("speedup=1.5x", "speedup", 1.5), ("latency=5ms", "latency", 5.0),
    ("latency=0.02s", "latency", 20.0), ("latency=7", "latency", 7.0), ("throughput=800", "throughput", 800.0),
    ("throughput=800img/s", "throughput", 800.0), ("gmacs=8.8", "gmacs", 8.8), ("GMACs = 4", "gmacs", 4.0),
])
def test_every_form_of_a_target_reads(text, kind, value):
    target = parse_target(text)
    assert (target.kind, target.value) == (kind, pytest.approx(value))
    assert parse_target(target.flag()) == target


@pytest.mark.parametrize("text, said", [
    ("2x", "a target is speedup=2, latency=5ms, throughput=800 or gmacs=8.8"),
    ("speed=2", "'speed' is none of speedup, latency, throughput, gmacs"),
    ("speedup=0", "should be a positive number"),
    ("speedup=-1", "should be a positive number"),
    ("latency=5kg", "units: ms, s"),
    ("gmacs=nan", "should be a positive number"),
    ("throughput=1e999", "should be a positive number"),
    ("speedup=2=3", "a target is"),
])
def test_a_bad_target_is_one_sentence(text, said):
    with pytest.raises(TietaError, match=said.replace("(", r"\(").replace(")", r"\)")):
        parse_target(text)


def test_a_target_is_met_on_its_own_side():
    assert Target("speedup", 2).met({"speedup": 2.0}) and not Target("speedup", 2).met({"speedup": 1.99})
    assert Target("latency", 5).met({"latency_ms": 4.0}) and not Target("latency", 5).met({"latency_ms": 6.0})
    assert Target("gmacs", 1).met({"gmacs": 1.0}) and not Target("gmacs", 1).met({})


def test_the_command_refuses_a_bad_target_and_a_method_that_does_not_reduce_tokens(capsys):
    assert "a target is" in refused(capsys, "plan", *TINY, "--target", "fast")
    assert "lora does not reduce tokens" in refused(capsys, "plan", *TINY, "--target", "speedup=2", "--methods",
                                                    "lora")
    assert "unknown method 'nope'" in refused(capsys, "plan", *TINY, "--target", "speedup=2", "--methods", "nope")
    assert "the speedup target" in refused(capsys, "report", "somewhere", "--budget", "speedup=fast")


# --- the search ----------------------------------------------------------------------------------

def test_a_gmacs_target_is_met_exactly_at_the_knob_s_resolution(vit):
    base = count_flops(vit, _one())["gmacs"]
    target = 0.7 * base
    rows = {row["method"]: row for row in plan(vit, f"gmacs={target}", ["evit", "dtem"], batch_size=2,
                                                rates=by_cost())}
    assert rows["unmodified"]["gmacs"] == pytest.approx(base) and not rows["unmodified"]["met"]
    evit = rows["evit"]
    assert evit["met"] and evit["gmacs"] <= target and evit["gmacs"] == pytest.approx(target, rel=0.03)
    dearer = count_flops(attached_at("evit", vit, evit["scalar"] + 0.01, _one()), _one())["gmacs"]
    assert dearer >= evit["gmacs"]
    dtem = rows["dtem"]  # whole tokens: the fewest merges that meet it, one fewer does not
    assert dtem["met"] and isinstance(dtem["setting"], int) and dtem["gmacs"] <= target
    fewer = count_flops(attached_at("dtem", vit, dtem["scalar"] - 1, _one()), _one())["gmacs"]
    assert fewer > target
    assert evit["speedup"] == pytest.approx(base / evit["gmacs"], rel=1e-6)  # timed once, beside the model



def test_the_user_s_model_is_left_as_it_was(vit):
    """Planned on a copy: the model keeps its training mode, its tensors and its modules."""
    mine = copy.deepcopy(vit).train()
    before = {name: tensor.clone() for name, tensor in mine.state_dict().items()}
    modules = [type(module) for module in mine.modules()]
    plan(mine, "gmacs=0.001", ["evit"], batch_size=2, rates=by_cost())
    assert all(module.training for module in mine.modules())
    assert [type(module) for module in mine.modules()] == modules
    assert mine.state_dict().keys() == before.keys()
    assert all(torch.equal(before[name], tensor) for name, tensor in mine.state_dict().items())

def test_a_speed_target_is_met_by_the_dearest_setting_whose_median_meets_it(vit):
    rows = {row["method"]: row for row in plan(vit, "speedup=1.4", ["evit", "tome"], batch_size=2,
                                                rates=by_cost(noise=0.05), steps=6)}
    for name in ("evit", "tome"):
        row = rows[name]
        assert row["met"] and row["speedup"] >= 1.4, row
        low, high = row["speedup_spread"]
        assert low < row["speedup"] < high and high >= 1.4  # the rounds' spread is kept and shown
        assert row["probes"] <= 2 + 6
        # the next dearer setting the knob resolves (1/64 of its range) is below the target
        dearer = attached_at(name, vit, min(1.0, row["scalar"] + (1.0 - 0.05) / 64 + 1e-3), _one())
        assert count_flops(vit, _one())["gmacs"] / count_flops(dearer, _one())["gmacs"] < 1.4


def test_latency_and_throughput_targets_read_the_batch_s_pass(vit):
    rows = plan(vit, "throughput=1", ["evit"], batch_size=4, rates=by_cost())
    evit = rows[1]
    assert evit["met"] and evit["setting"] == pytest.approx(1.0)  # the dearest meets a loose target
    assert evit["images_per_s"] == pytest.approx(4 * 1000.0 / evit["gmacs"])
    assert evit["latency_ms"] == pytest.approx(evit["gmacs"])  # 1000 ms / (1000 / gmacs calls per second)
    tight = plan(vit, f"latency={0.8 * rows[0]['gmacs']}ms", ["evit"], batch_size=4, rates=by_cost())[1]
    assert tight["met"] and tight["latency_ms"] <= 0.8 * rows[0]["gmacs"]


def test_an_unreachable_target_is_one_sentence_per_method(vit):
    rows = {row["method"]: row for row in plan(vit, "speedup=10", ["dyt", "evit"], rates=by_cost())}
    dyt = rows["dyt"]
    assert not dyt["met"] and dyt["probes"] == 1 and dyt["simulated"]
    assert dyt["note"].startswith("dyt cannot reach a speedup of 10x at any dyt.rho: its cheapest setting (0.05) "
                                  "measures ")
    assert rows["evit"]["note"].startswith("evit cannot reach a speedup of 10x at any evit.keep_rate")


def test_a_method_without_a_knob_is_left_out_with_a_sentence(vit):
    row = plan(vit, "gmacs=1", ["diffrate"], rates=by_cost())[1]
    assert not row["met"] and row["setting"] is None and "declares no knob to search" in row["note"]


def test_plan_is_a_public_verb():
    import tieta
    import tieta.measure.plan

    assert tieta.plan is tieta.measure.plan.plan


def test_dyt_is_timed_at_the_rate_its_training_aims_for(vit):
    half, most = (count_flops(attached_at("dyt", vit, rho, _one()), _one())["gmacs"] for rho in (0.5, 1.0))
    assert half < most  # as attached, untrained, its dispatchers would follow no rate
    row = plan(vit, "gmacs=1", ["dyt"], rates=by_cost())[1]
    assert row["simulated"] and "rate its training aims for" in row["note"]


def test_a_real_timing_of_few_rounds_runs_and_keeps_its_spread(vit):
    messages = []
    rows = plan(vit, "speedup=1.0", ["evit"], batch_size=2, rounds=2, steps=1, log=messages.append)
    evit = rows[1]
    assert len(evit["round_speedups"]) == 2 and evit["speedup_spread"][0] <= evit["speedup"]
    assert evit["latency_ms"] > 0 and rows[0]["latency_ms"] > 0
    assert any("round 1 of 2" in message for message in messages)
    bf16 = plan(vit, "speedup=1.0", ["evit"], batch_size=2, dtype=torch.bfloat16, rounds=1, steps=0)[1]
    assert bf16["probes"] <= 2 and bf16["latency_ms"] > 0


# --- the command and its sweep file --------------------------------------------------------------

def test_the_plan_s_sweep_file_validates_and_trains(tmp_path, capsys, monkeypatch):
    import tieta.measure.plan as plan_module

    monkeypatch.setattr(plan_module, "model_rates_for", lambda *args: by_cost())
    output = tmp_path / "plan.yaml"
    assert main(["plan", *TINY, "--target", "gmacs=0.0035", "--methods", "evit", "fpet", "--batch-size", "2",
                 "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "evit.keep_rate=" in out and "1 of 2 methods meet 0.0035 GMACs" in out
    assert "fpet cannot reach 0.0035 GMACs at any fpet.layers" in out
    text = output.read_text()
    assert text.startswith("# tieta plan: each method at the setting that met 0.0035 GMACs on cpu, batch 2, fp32")
    values = yaml.safe_load(text)
    assert list(values["runs"]) == ["lora", next(name for name in values["runs"] if name.startswith("evit-"))]
    assert values["base"] == {"model": "test_vit", "img_size": SIZE}
    # a plan never replaces a file, unless asked to
    assert "already exists" in refused(capsys, "plan", *TINY, "--target", "gmacs=0.0035", "--output", str(output))
    assert main(["plan", *TINY, "--target", "gmacs=0.0035", "--methods", "evit", "--rounds", "1", "--output",
                 str(output), "--overwrite"]) == 0
    assert "--methods evit" in output.read_text() and "fpet" not in output.read_text()
    capsys.readouterr()
    task = write_vtab_task(tmp_path / "task")
    with pytest.raises(TietaError, match="tasks should be a non-empty list"):
        read_plan(output)
    assert main(["sweep", str(output), "--data", str(task), "--output", str(tmp_path / "sweep"), "--set",
                 "weights=random", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4", "--lora-rank",
                 "2"]) == 0
    capsys.readouterr()
    for run in values["runs"]:
        assert (tmp_path / "sweep" / "task" / run / "seed0" / "summary.json").is_file(), run


def test_runs_are_named_by_method_and_setting():
    assert run_name({"method": "evit", "knob": "evit.keep_rate", "scalar": 0.4531}) == "evit-keep_rate0.4531"
    assert run_name({"method": "tome", "knob": "merge.schedule", "scalar": 0.5}) == "tome-schedule0.5"


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--img-size", "33"], "img_size 33 is not a multiple of test_vit's patch size 16"),
    (["--model", "resnet18"], "VisionTransformer"),
    (["--device", "foo"], "'foo' is not a device"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice"),
    (["--batch-size", "100000000"], "the batch size must be at most"),
    (["--rounds", "0"], "argument --rounds: must be at least 1"),
])
def test_plan_refuses_before_it_times_anything(capsys, args, message):
    base = ["plan", "--target", "speedup=2"] + (["--model", "test_vit"] if "--model" not in args else [])
    assert message in refused(capsys, *base, *args)


def test_plan_output_is_checked_before_the_minutes_of_timing(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    command = ["plan", "--model", "test_vit", "--target", "speedup=2", "--output"]
    assert "is a file, not a folder" in refused(capsys, *command, str(tmp_path / "file" / "plan.yaml"))
    assert "it is a folder; give a file name" in refused(capsys, *command, str(tmp_path))

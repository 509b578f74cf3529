"""The ``tieta`` command: thin subcommands over the Python surface.

Every subcommand turns bad input into one sentence on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from tieta.errors import TietaError
from tieta.measure.suites import SUITES, suites_help
from tieta.methods import catalog, registry  # names and flags only: --help must not load torch
from tieta.reference import codes  # the reference codes' names, for tieta import's --help

# command-line flag -> config key, for the general settings people change most (each method
# declares its own flags in its registry entry)
FLAG_KEYS = {
    "model": "model",
    "weights": "weights",
    "data": "data.path",
    "method": "method",
    "img_size": "img_size",
    "epochs": "optim.epochs",
    "warmup_epochs": "optim.warmup_epochs",
    "lr": "optim.lr",
    "batch_size": "optim.batch_size",
    "weight_decay": "optim.weight_decay",
    "seed": "seed",
    "device": "device",
    "eval_every": "eval_every",
}
# the training conveniences, by timm's train.py names where it has them
FLAG_KEYS.update({
    "amp": "amp",
    "grad_accum_steps": "optim.grad_accum_steps",
    "drop_path": "drop_path",
    "min_lr": "optim.min_lr",
    "clip_grad": "optim.clip_grad",
    "workers": "data.num_workers",
    "smoothing": "optim.label_smoothing",
    "log": "log",
})


def _method_flags() -> dict[str, Any]:
    """argparse dest -> the registry's Flag, for every method's flags."""
    return {flag.option.lstrip("-").replace("-", "_"): flag for flag in registry.flags()}


def _argument_type(parse):
    """A flag's parser whose TietaError argparse reports as a usage error (one sentence, exit 2)."""
    def typed(text: str) -> Any:
        try:
            return parse(text)
        except TietaError as error:
            raise argparse.ArgumentTypeError(str(error)) from error

    typed.__name__ = getattr(parse, "__name__", "value")
    return typed


def _positive_int(text: str) -> int:
    """A whole number of at least 1, as an argparse type (anything else is a usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _folder_to_write(path: Path) -> Path:
    """An output folder, refused (one sentence) where a file stands in its place or above it."""
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise TietaError(f"cannot write into {path}: {part} is a file, not a folder")
            break
    return path


def _file_to_write(path: Path) -> Path:
    """An output file, refused (one sentence) where it is a folder or a file stands above it."""
    if path.is_dir():
        raise TietaError(f"cannot write {path}: it is a folder; give a file name")
    _folder_to_write(path.parent)
    return path


def _add_config_arguments(parser: argparse.ArgumentParser, data_required: bool, grid: bool = False) -> None:
    """The settings flags; ``grid``: --method and --data take several values (a sweep's grid), and
    there is no --config (a sweep file has its own base settings)."""
    if not grid:
        parser.add_argument("--config", type=Path, help="YAML file of settings (command-line flags override it)")
    parser.add_argument("--model", help="timm model name (default vit_base_patch16_224; left out with a "
                        "transformers checkpoint as --weights)")
    parser.add_argument("--weights", help="weights file (.safetensors/.pth/.bin/.npz), 'random', "
                        "'dinov2_vits14_saliency' (the built-in backbone, no hub needed: with --model "
                        "vit_small_patch14_dinov2), or a transformers checkpoint: a save_pretrained folder or "
                        "hf:ORG/NAME (ViT, DINOv2, CLIP, SigLIP); default: timm's published weights from the hub")
    parser.add_argument("--method", nargs="+" if grid else None,
                        help=f"methods joined by '+': {', '.join(registry.names())}, attached in the order named "
                        "(default lora)"
                        + ("; several: one run each" if grid else ""))
    parser.add_argument("--img-size", type=int, help="input resolution (default: the model's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config setting, e.g. --set optim.lr_groups.head=1e-2 (repeatable)")
    for flag in registry.flags():
        long_list = flag.choices is not None and len(flag.choices) > 6  # named in the help, not the usage line
        parser.add_argument(flag.option, type=_argument_type(flag.parse), choices=flag.choices, help=flag.help,
                            metavar="NAME" if long_list else None)
    if data_required is not None:
        parser.add_argument("--data", required=data_required, nargs="+" if grid else None,
                            help="task: a VTAB-1k or train/<class>/ folder, a folder with train.csv + test.csv, a saved "
                            "datasets DatasetDict, hf:NAME, or a <class>/ tree or list.csv with --set data.holdout=0.2; "
                            "a folder of clips, or a segmentation task (images/ and annotations/ of label masks)"
                            + ("; several" if grid else ""))


def _add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, help="training epochs (default 100)")
    parser.add_argument("--warmup-epochs", type=int, help="linear warm-up epochs (default: a tenth of the epochs, "
                        "at most 10)")
    parser.add_argument("--lr", type=float, help="base learning rate (default 1e-3)")
    parser.add_argument("--batch-size", type=int, help="training batch size (default 64)")
    parser.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 1e-4)")
    parser.add_argument("--eval-every", type=int, help="epochs between evaluations (default 1)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (the same as --amp bf16)")
    _add_training_habit_arguments(parser)


def _add_training_habit_arguments(parser: argparse.ArgumentParser) -> None:
    """Mixed precision, accumulation, regularisation, data workers and loggers (timm's names)."""
    parser.add_argument("--amp", choices=("bf16", "fp16"), help="autocast: bf16, or fp16 with a gradient scaler "
                        "(default: fp32)")
    parser.add_argument("--grad-accum-steps", type=_positive_int, metavar="N",
                        help="batches per optimizer step: N x --batch-size images a step (default 1)")
    parser.add_argument("--drop-path", type=float, help="stochastic depth rate of the backbone (default 0.1)")
    parser.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine (default 1e-5)")
    parser.add_argument("--clip-grad", type=float, help="largest gradient norm (default: no clipping)")
    parser.add_argument("--workers", type=int, help="data-loading processes (default 0: in the training process)")
    parser.add_argument("--smoothing", type=float, help="label smoothing of the cross-entropy (default 0)")
    parser.add_argument("--log", action="append", choices=("csv", "tensorboard", "wandb"),
                        help="also log each epoch: csv (summary.csv), tensorboard, wandb (repeatable)")


def _add_image_sample_arguments(parser: argparse.ArgumentParser, overwrite_help: str) -> None:
    parser.add_argument("--split", default="test", help="split to take images from (default test)")
    parser.add_argument("--count", type=_positive_int, default=4, help="number of images (default 4)")
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)


def _config_from(args: argparse.Namespace):
    from tieta.train.config import load_config

    return load_config(args.config, _overrides_from(args))


def _overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted settings the flags and --set give (those not given are left out)."""
    from tieta.train.config import parse_override

    overrides: dict[str, Any] = {}
    keys = {**FLAG_KEYS, **{dest: flag.key for dest, flag in _method_flags().items()}}
    for dest, key in keys.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "bf16", False):
        if getattr(args, "amp", None) not in (None, "bf16"):
            raise TietaError(f"--bf16 is --amp bf16; give one of --bf16 and --amp {args.amp}")
        overrides["amp"] = "bf16"
    overrides.update(dict(parse_override(item) for item in args.set))
    return overrides


def _print_summary(rows: list[dict[str, Any]], demo: bool = False) -> None:
    from tieta.report.tables import DEMO_COLUMNS, format_table, summary_columns

    print(format_table(rows, DEMO_COLUMNS if demo else summary_columns(rows)))


def cmd_train(args: argparse.Namespace) -> int:
    from tieta.train.fit import fit, resume_run
    from tieta.train.reading import summary_notes

    if args.resume is not None:
        given = [key for key in _overrides_from(args) if key != "device"]
        if given or args.config or args.output or args.overwrite:
            raise TietaError("--resume continues a run with its own settings and folder; give only the run folder "
                             "(and --device to move it)")
        summary = resume_run(args.resume, args.device)
        folder = args.resume
    else:
        if args.output is None:
            raise TietaError("give --output (the run folder to create), or --resume RUN_DIR to continue a run")
        summary = fit(_config_from(args), args.output, overwrite=args.overwrite)
        folder = args.output
    if summary:  # under torchrun, the first process reports
        _print_summary([summary])
        for note in summary_notes(summary):
            print(note)
        print(f"run folder: {folder}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from tieta.sweep.plan import check_settings, plan_from_flags, read_plan, select, task_folders
    from tieta.sweep.runner import FAILED, run_sweep

    # --method and --data are the grid, not settings (a --set of them is a setting, and refused as one)
    # and --device is where they train (as --devices with one device), not a setting of each run
    settings = _overrides_from(argparse.Namespace(**{**vars(args), "method": None, "data": None, "device": None}))
    _folder_to_write(args.output)
    if args.sweep_file is not None:
        if args.method:
            raise TietaError("give either a sweep file or --data and --method, not both (--tasks and --runs "
                             "choose within a sweep file; --data gives a sweep file its tasks)")
        if args.data and (args.root or args.tasks):
            raise TietaError("--data gives the sweep file's tasks; --root and --tasks choose among the file's own")
        given = task_folders(args.data) if args.data else None
        plan = select(read_plan(args.sweep_file, args.root, given), args.tasks, args.runs)
        plan.base.update(check_settings(settings, "--set"))
        if args.seeds:
            plan.seeds = list(args.seeds)
    else:
        if not args.data or not args.method:
            raise TietaError("give a sweep file, or --data TASK_DIR... and --method METHOD...")
        if args.tasks or args.runs or args.root:
            raise TietaError("--tasks, --runs and --root choose within a sweep file; with --data and --method, "
                             "the grid is what they name")
        plan = plan_from_flags(args.data, args.method, args.seeds or [0], settings)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    if args.device is not None:
        if devices is not None:
            raise TietaError("give --device (one device) or --devices (several), not both")
        if "," in args.device:
            raise TietaError(f"--device takes one device, got {args.device!r}; give several with --devices")
        devices = [args.device.strip()]
    outcomes = run_sweep(plan, args.output, devices)
    print(f"next: tieta report {args.output}")
    return 1 if any(outcome.status == FAILED for outcome in outcomes) else 0


def cmd_report(args: argparse.Namespace) -> int:
    from tieta.measure.target import parse_target
    from tieta.report.sweep_report import write_report

    budget = parse_target(args.budget) if args.budget is not None else None  # before any timing
    written = write_report(args.folder, args.output, bench=not args.no_bench, device=args.device,
                           batch_size=args.batch_size, rounds=args.rounds, rebench=args.rebench, budget=budget)
    print(written["reading"])
    print("wrote " + ", ".join(str(path) for path in written["files"]))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tieta.report.tables import format_table, summary_columns
    from tieta.train.fit import evaluate_checkpoint
    from tieta.train.reading import summary_notes

    result = evaluate_checkpoint(args.run, args.data, args.split, args.batch_size, args.device, best=args.best)
    result["notes"] = summary_notes(result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.run}{' (best epoch)' if args.best else ''}: {result['split']} split, {result['images']} "
          f"{result['input_kind']}s")
    shown = {**result, "top5": "n/a" if result.get("top5") is None else result["top5"]}  # under 5 classes
    print(format_table([shown], summary_columns([shown], evaluation=True)))
    for note in result["notes"]:
        print(note)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from tieta.reference.importer import import_checkpoint
    from tieta.train.config import parse_override

    settings = dict(parse_override(item) for item in args.set)
    result = import_checkpoint(args.kind, args.file, args.output, model=args.model, num_classes=args.num_classes,
                               data=args.data, img_size=args.img_size, schedule=args.schedule, settings=settings,
                               overwrite=args.overwrite)
    for note in result.notes:
        print(f"note: {note}")
    print(f"imported {args.file} ({args.kind} code) as {result.method}, {result.num_classes} classes: "
          f"{result.trained:,} trained parameters, {result.backbone:,} in the backbone")
    print(f"run folder: {result.output}")
    print(f"next: tieta eval {result.output}" + ("" if args.data else " --data TASK_DIR"))
    return 0


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def cmd_export(args: argparse.Namespace) -> int:
    from tieta.deploy.export import export_run

    _folder_to_write(args.output)
    if args.format == "transformers":
        return _export_transformers(args)
    written = export_run(args.run, args.output, overwrite=args.overwrite,
                         onnx_batch_size=args.onnx_batch_size if args.onnx else None, best=args.best)
    print(f"exported {written['model']} + {written['method']} to {written['output']}")
    print(f"  sizes: the run's checkpoint {_size(written['checkpoint_bytes'])} (trained tensors only), the export "
          f"{_size(written['export_bytes'])} (the whole inference model), the backbone alone "
          f"{_size(written['backbone_bytes'])}")
    print(f"  load it with: tieta.load({str(written['output'])!r})")
    if args.onnx:
        print(f"  model.onnx ({_size(written['onnx_bytes'])}, batch {written['onnx_batch_size']}): largest logit "
              f"difference from PyTorch in onnxruntime {written['onnx_max_difference']:.1e}")
    return 0


def _export_transformers(args: argparse.Namespace) -> int:
    from tieta.deploy.export import export_transformers_run

    if args.onnx:
        raise TietaError("--onnx goes with tieta's own export format; leave out --format transformers or --onnx")
    written = export_transformers_run(args.run, args.output, overwrite=args.overwrite)
    print(f"exported {written['model']} + {written['method']} to {written['output']} as transformers' "
          f"{written['transformers_class']} ({_size(written['export_bytes'])})")
    print(f"  logits: {written['note']}")
    print(f"  largest logit difference from tieta's model: {written['max_difference']:.1e}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from tieta.deploy.predict import open_predictor, predict, predictions_csv, shown_path
    from tieta.report.tables import PREDICT_COLUMNS, format_table
    from tieta.files import write_file

    if args.output is not None and not args.output.is_dir():  # a folder: a segmentation model's masks
        _file_to_write(args.output)
        if args.output.exists() and not args.overwrite:
            raise TietaError(f"{args.output} already exists; pick another path or pass --overwrite")
    predictor = open_predictor(args.source)

    def report_skip(path: Path, why: str) -> None:
        print(f"tieta: skipped {path}: {why}", file=sys.stderr)

    if predictor.segmentation is not None:
        return _predict_masks(args, predictor, report_skip)
    if args.output is not None:
        _file_to_write(args.output)  # a folder: refused in its sentence
    found = predict(predictor, args.images, args.top_k, args.batch_size, args.device, report_skip)
    if args.output is not None:
        write_file(args.output, predictions_csv(found, min(args.top_k, len(found.rows[0][1]))))
    else:
        rows = [{"image": shown_path(path), "class": top[0][0], "probability": top[0][1],
                 "next": ", ".join(f"{name} {p:.2f}" for name, p in top[1:])} for path, top in found.rows]
        print(format_table(rows, PREDICT_COLUMNS))
    skipped = f", skipped {len(found.skipped)} (see above)" if found.skipped else ""
    written = f"; wrote {args.output}" if args.output else ""
    item = "clip" if predictor.video is not None else "image"
    plural = "s" if len(found.rows) != 1 else ""
    print(f"classified {len(found.rows)} {item}{plural}{skipped}{written}", file=sys.stderr)
    return 0


def _predict_masks(args: argparse.Namespace, predictor, report_skip) -> int:
    """``tieta predict`` with a segmentation model: a mask and an overlay per image in --output."""
    from tieta.deploy.predict import shown_path
    from tieta.deploy.predict_masks import classes_text, predict_masks
    from tieta.report.tables import MASK_COLUMNS, format_table

    if args.output is None:
        raise TietaError(f"{args.source} is a segmentation model, which writes a mask and an overlay per image: give "
                         "--output DIR")
    found = predict_masks(predictor, args.images, args.output, args.overwrite, args.device, report_skip)
    rows = [{"image": shown_path(image), "mask": mask.name, "classes": classes_text(shares, predictor.name)}
            for image, mask, _, shares in found.rows]
    print(format_table(rows, MASK_COLUMNS))
    skipped = f", skipped {len(found.skipped)} (see above)" if found.skipped else ""
    plural = "s" if len(found.rows) != 1 else ""
    print(f"segmented {len(found.rows)} image{plural}{skipped}; wrote a mask (*_mask.png) and an overlay "
          f"(*_overlay.png) of each into {args.output}", file=sys.stderr)
    return 0


def cmd_checksum(args: argparse.Namespace) -> int:
    from tieta.train.checkpoint import add_checksum, read_tensors

    for path in args.files:
        if args.write:
            added = add_checksum(path)
            print(f"{path}: " + ("checksum added" if added else "checksum verified (it already had one)"))
        else:
            read_tensors(path)
            print(f"{path}: checksum verified")
    return 0


def _cost_rows(label: str, plain: dict[str, float], with_method: dict[str, float],
               plain_label: str = "timm (no method)") -> list[dict[str, Any]]:
    """The rows of ``tieta flops``' table: the unmodified timm model (named ``plain_label``), then
    the model with the method (named ``label``), each with its cost ratio to the unmodified one."""
    rows = [{"name": plain_label, **plain}, {"name": label, **with_method}]
    for row in rows:
        row["ratio"] = row["gmacs"] / plain["gmacs"]
    return rows


def cmd_flops(args: argparse.Namespace) -> int:
    import textwrap

    import torch

    from tieta.measure.flops import count_flops
    from tieta.methods.params import trainable_parameters
    from tieta.report.tables import FLOPS_COLUMNS, fact_label, format_table
    from tieta.device import resolve_device
    from tieta.train.fit import describe_methods
    from tieta.train.model import build_model, build_plain_model, example_input, image_size_of
    from tieta.dense.config import is_segmentation

    config = _config_from(args)
    device = resolve_device(args.device or "cpu")  # the count is the same anywhere; a large model is faster on a GPU
    # costs do not depend on the weights, so both start from random ones
    model = build_model(config, args.num_classes, random_weights=True).to(device)
    plain = build_plain_model(config, args.num_classes, random_weights=True).to(device)
    size = image_size_of(model)
    inputs = example_input(model, torch.Generator().manual_seed(0))  # an image, or a clip of a video model's frames
    # a segmentation model's baseline: the same neck and heads on the unmodified backbone
    rows = _cost_rows(f"{config.model} + {config.method}", count_flops(plain, inputs), count_flops(model, inputs),
                      "timm + UPerNet (no method)" if is_segmentation(config) else "timm (no method)")
    trainable, total = trainable_parameters(model)
    frames = getattr(model, "frames", None)
    unit = "per image" if frames is None else f"per clip of {frames} frames"
    print(f"{config.model} + {config.method} at {size} px, {unit}:")
    print(textwrap.indent(format_table(rows, FLOPS_COLUMNS), "  "))
    print("  (GMACs: multiply-accumulates / 1e9, the unit tieta shows everywhere; the PYRA paper divides by 2^30)")
    print(f"  parameters: {total:,} ({trainable:,} trainable, {100 * trainable / total:.3f}%)")
    for key, value in describe_methods(model, config).items():
        print(f"  {fact_label(key)}: {value}")
    dependent = [method.name for method in config.method_list if method.data_dependent_cost]
    if dependent:
        print(f"  {', '.join(dependent)}: the cost depends on the images and the trained weights; this is one random "
              f"{'image' if frames is None else 'clip'} with untrained ones; a trained run's summary.json counts the executed path on real test images")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tieta.demo import BENCH_BATCH_SIZE, default_output, run_demo
    from tieta.device import resolve_device

    output = _folder_to_write(args.output or default_output())
    if args.device is not None:
        resolve_device(args.device)  # a device this machine lacks, before anything is fetched
    report = run_demo(output, args.epochs, device=args.device)
    summaries = report["summaries"]
    print()
    print(f"tieta demo: ELPV solar cells, 4 classes, {summaries[0]['img_size']} px, {summaries[0]['device']}; "
          f"eval img/s and speedup measured side by side at batch {BENCH_BATCH_SIZE}")
    majority = next((row for row in report["rows"] if row.run == "majority class"), None)
    _print_summary(summaries + ([{"method": "(majority class)", "acc": majority.headline.mean}] if majority else []),
                   demo=True)
    print()
    print(report["reading"])
    print(f"report and plots: {output / 'report.md'}, {output / 'accuracy_vs_throughput.png'}")
    return 0


# fewer interleaved rounds than this cannot rank speeds by their spread (tieta.report.speed.MIN_ROUNDS)
RELIABLE_ROUNDS = 5


def _bench_progress(text: str) -> None:
    print(f"tieta bench: {text}", file=sys.stderr, flush=True)


def cmd_bench(args: argparse.Namespace) -> int:
    from tieta.files import write_file
    from tieta.measure.bench_suite import check_sizes, run_suite
    from tieta.measure.load import load_text, watched_load
    from tieta.report.speed import bench_reading, spread_text
    from tieta.report.tables import bench_columns, format_table
    from tieta.device import resolve_device

    args.device = str(resolve_device(args.device))  # before minutes of timing: "cuda:7", "foo"
    if args.output is not None:
        _file_to_write(args.output)
    # sizes that could not fit are refused before any model is allocated or timed
    check_sizes(args.model, args.img_size, args.batch_size, args.dtype, args.train, args.device, args.frames)
    if args.rounds < RELIABLE_ROUNDS:
        print(f"tieta: warning: medians over fewer than {RELIABLE_ROUNDS} interleaved rounds are not reliable, "
              f"so take these numbers as a smoke test (--rounds {args.rounds}; the default is 7)", file=sys.stderr)
    with watched_load() as load:
        rows = run_suite(args.model, args.img_size, args.batch_size, args.dtype, args.schedules, args.rounds,
                         args.train, args.device, log=_bench_progress, frames=args.frames, suite=args.suite)
    for row in rows:
        row["speedup_range"] = spread_text(row)
    kind = "training steps" if args.train else "evaluation"
    batch = f"batch {args.batch_size}" if args.frames is None else \
        f"batch {args.batch_size} clips of {args.frames} frames (img/s counts clips)"
    print(f"{args.model}, {kind}, {batch}, {args.dtype}, {args.device}, "
          f"median of {args.rounds} interleaved rounds (speedup: per-round ratio to the first row, its range over "
          f"the rounds beside it); {load_text(load)}")
    print(format_table(rows, bench_columns(rows, efficiency=not args.train)))
    print()
    print("\n".join(bench_reading(rows, args.rounds, load, efficiency=not args.train)))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
        write_file(args.output, json.dumps({"settings": settings, "load": load, "rows": rows}, indent=2) + "\n")
    return 0


def _plan_progress(text: str) -> None:
    print(f"tieta plan: {text}", file=sys.stderr, flush=True)


def _plan_command(args: argparse.Namespace, target) -> str:
    """The ``tieta plan`` command line that made a plan, for the head of its file."""
    parts = ["tieta plan", f"--model {args.model}", f"--target {target.flag()}", f"--batch-size {args.batch_size}",
             f"--device {args.device}", f"--dtype {args.dtype}", f"--rounds {args.rounds}"]
    parts += [f"--weights {args.weights}"] if args.weights else []
    parts += [f"--img-size {args.img_size}"] if args.img_size else []
    parts += [f"--methods {' '.join(args.methods)}"] if args.methods else []
    return " ".join(parts)


def cmd_plan(args: argparse.Namespace) -> int:
    from tieta.backbone import load_backbone
    from tieta.device import resolve_device
    from tieta.files import write_file
    from tieta.measure.bench_suite import DTYPES, check_sizes
    from tieta.measure.load import busy_note, load_text, watched_load
    from tieta.measure.plan import chosen_methods, plan
    from tieta.measure.target import parse_target
    from tieta.report.plan_table import plan_reading, plan_table
    from tieta.sweep.planned import plan_sweep, sweep_text

    target = parse_target(args.target)  # every refusal before minutes of timing
    chosen_methods(args.methods)
    if args.output is not None:
        _file_to_write(args.output)
        if os.path.lexists(args.output) and not args.overwrite:
            raise TietaError(f"{args.output} already exists; pick another path or pass --overwrite")
    device = str(resolve_device(args.device))
    check_sizes(args.model, args.img_size, args.batch_size, args.dtype, False, device)
    if target.timed and args.rounds < RELIABLE_ROUNDS:
        print(f"tieta: warning: medians over fewer than {RELIABLE_ROUNDS} interleaved rounds are not reliable, "
              f"so take these settings as a smoke test (--rounds {args.rounds}; the default is 5)", file=sys.stderr)
    _plan_progress(f"building {args.model} ({args.weights or 'random'} weights) and counting its FLOPs")
    model = load_backbone(args.model, weights=args.weights or "random", img_size=args.img_size)
    with watched_load() as load:
        rows = plan(model, target, args.methods, args.batch_size, device, DTYPES[args.dtype], rounds=args.rounds,
                    log=_plan_progress)
    where = f"{device}, batch {args.batch_size}, {args.dtype}"
    print(f"{args.model}, evaluation, {where}, each setting timed beside the unmodified model in {args.rounds} "
          f"interleaved rounds; {load_text(load)}")
    print(plan_table(rows))
    print()
    reading = plan_reading(rows, target, where, args.rounds)
    note = busy_note(load) if target.timed else None
    print(reading + (f" {note}" if note else ""))
    if args.output is not None:
        values = plan_sweep(rows, args.model, args.weights, args.img_size)
        command = _plan_command(args, target)
        write_file(args.output, sweep_text(values, target, where, command))
        met = len(values["runs"]) - 1
        print(f"wrote {args.output} ({met} method{'s' if met != 1 else ''} at {'their settings' if met != 1 else 'its setting'}, "
              f"and LoRA alone); next: tieta sweep {args.output} --data TASK_DIR... --output SWEEP_DIR"
              if met else f"wrote {args.output}: no method met the target, so it holds LoRA alone")
    elif any(row.get("met") and row.get("knob") for row in rows):
        print("--output FILE writes these settings as a sweep file, to train them with tieta sweep")
    return 0


def cmd_show_merges(args: argparse.Namespace) -> int:
    from tieta.report.visualize import merge_groups, save_merge_figure
    from tieta.train.record import normalization_of
    from tieta.device import resolve_device
    from tieta.train.model import image_size_of, seed_everything
    from tieta.train.run_model import load_run_model
    from tieta.train.model import build_model

    picture, note = _merge_picture(args.output)
    if picture.exists() and not args.overwrite:
        raise TietaError(f"{picture} already exists; pick another --output or pass --overwrite")
    _file_to_write(picture)
    asked = resolve_device(args.device) if args.device else None  # before any model is built
    if args.run is not None:
        model, config, _ = load_run_model(args.run)
        _refuse_without_merges(config, f"the run {args.run}")
    else:
        if args.data is None:
            raise TietaError("give --data (a task folder) for the images to show, or --run")
        config = _config_from(args)
        if not _method_named(args, config):  # nothing named: the first method whose merges can be drawn
            config.method = _merging_methods()[0]
        _refuse_without_merges(config, "--method")
        seed_everything(config.seed)
        model = build_model(config, num_classes=1000)
    device = asked or resolve_device(config.device)
    images, inputs, names = _sample_images(args.data or config.data.path, args.split, args.count,
                                           image_size_of(model), normalization_of(config, model))
    groups = merge_groups(model.to(device), inputs.to(device)).cpu()
    caption = f"{config.model} + {config.method}{_merge_facts(model, config)}"
    save_merge_figure(images, groups, picture, names, caption)
    print(f"wrote {picture}")
    if note:
        print(f"tieta: note: {note}", file=sys.stderr)
    return 0


MERGES_PNG = "merges.png"


def _in_words(names: list[str], last: str) -> str:
    """["a", "b", "c"] -> "a, b and c" (``last`` the joining word)."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


def _merge_facts(model, config) -> str:
    """", tokens per block [...]" as the merging method describes them, for the picture's caption."""
    for method in config.method_list:
        if method.shows_merges and method.describe is not None:
            counts = method.describe(model).get("token_counts")
            if counts is not None:
                return f", tokens per block {list(counts)}"
    return ""


def _merging_methods() -> list[str]:
    """The methods whose token merges show-merges can paint, in the registry's order."""
    return [method.name for method in registry.METHODS.values() if method.shows_merges]


def _method_named(args: argparse.Namespace, config) -> bool:
    """Whether the user named the methods (--method, --set method=..., or a config file's method)."""
    from tieta.train.config import GeneralConfig

    return "method" in _overrides_from(args) or config.method != GeneralConfig.method


def _refuse_without_merges(config, named: str) -> None:
    """One sentence where none of the config's methods has merges to paint."""
    if not any(method.shows_merges for method in config.method_list):
        raise TietaError(f"{named} ({config.method}) merges no tokens to show; show-merges draws the merges of "
                         f"{_in_words(_merging_methods(), 'and')}")


def _merge_picture(output: Path) -> tuple[Path, Optional[str]]:
    """Where show-merges draws: ``merges.png`` in the folder ``output``, as show-tokens does; a path
    ending in .png (what --output named before) is still taken as the file, with a note."""
    if output.suffix.lower() == ".png" and not output.is_dir():
        return output, (f"--output names a folder now (the picture is {MERGES_PNG} in it); a .png file name is "
                        "still taken as the file, but may not be in a later version")
    return _folder_to_write(output) / MERGES_PNG, None


def _sample_images(task_dir: str, split: str, count: int, image_size: int, normalization: dict):
    """A few evenly spaced images of a split (a segmentation task's: its images, without their
    masks): (uint8 images, normalised images, their paths)."""
    import torch

    from tieta.data.transforms import Normalize
    from tieta.data.vtab import ImageDataset, open_task
    from tieta.dense.dataset import is_segmentation_task, open_segmentation_task

    if is_segmentation_task(task_dir):
        items = [(image, 0) for image, _ in open_segmentation_task(task_dir).split(split)]
    else:
        items = open_task(task_dir).split(split)
    chosen = items[:: max(1, len(items) // count)][:count]
    dataset = ImageDataset(chosen, image_size, max(label for _, label in chosen) + 1, cache=True)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return images, Normalize(normalization)(images), [path.name for path, _ in chosen]


def cmd_show_tokens(args: argparse.Namespace) -> int:
    from tieta.methods.state import pass_state_named
    from tieta.report.visualize import save_active_tokens, save_rate_chart
    from tieta.device import resolve_device
    from tieta.train.model import image_size_of
    from tieta.train.run_model import load_run_model
    from tieta.train.record import normalization_of
    from tieta.video.config import is_video
    from tieta.video.model import frame_backbone

    _folder_to_write(args.output)
    asked = resolve_device(args.device) if args.device else None  # before any model is built
    rates_png, tokens_png = args.output / "activation_rates.png", args.output / "active_tokens.png"
    for path in (rates_png, tokens_png):
        if path.exists() and not args.overwrite:
            raise TietaError(f"{path} already exists; pick another --output or pass --overwrite")
    model, config, _ = load_run_model(args.run)
    showing = [method for method in config.method_list if method.token_masks is not None]
    if not showing:
        drawn = [method.name for method in registry.METHODS.values() if method.token_masks is not None]
        raise TietaError(f"the run {args.run} ({config.method}) has no token decisions to show; show-tokens draws "
                         f"those of {_in_words(drawn, 'and')}")
    method = showing[0]
    if is_video(config):  # a clip's frames (the named one, or the split's first)
        return _show_video_tokens(args, model, config, method, asked, rates_png, tokens_png)
    if args.clip is not None:
        raise TietaError(f"--clip goes with a video run; the run {args.run} classifies images")
    images, inputs, names = _sample_images(args.data or config.data.path, args.split, args.count,
                                           image_size_of(model), normalization_of(config, model))
    device = asked or resolve_device(config.device)
    # a segmentation model's decisions are its backbone's, on the images resized to its input
    masks = [mask.cpu() for mask in method.token_masks(frame_backbone(model.to(device)), inputs.to(device))]
    rates = [float(mask.float().mean()) for mask in masks]
    note = f" ({method.picture_note(config)})" if method.picture_note is not None else ""
    caption = f"{config.model} + {config.method}{note}, {len(names)} {args.split} images"
    words = _decision_words(method)
    save_rate_chart(rates, rates_png, caption, *words)
    written = [rates_png]
    grid = tuple(model.patch_embed.grid_size)
    if pass_state_named(model, "token_state") is None or _over_the_grid(masks, grid):
        layers = sorted({round(i * (len(masks) - 1) / 3) for i in range(4)})
        save_active_tokens(images, masks, grid, tokens_png, layers, caption, *words)
        written.append(tokens_png)
    else:
        print("tokens are merged in this model, so they no longer map to patches: no active-token picture")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _show_video_tokens(args: argparse.Namespace, model, config, method, asked, rates_png: Path,
                       tokens_png: Path) -> int:
    from tieta.device import resolve_device
    from tieta.report.video_tokens import first_clip, show_video_tokens
    from tieta.train.record import normalization_of

    clip = args.clip or first_clip(config, args.data, args.split)
    written = show_video_tokens(model, config, method, clip, normalization_of(config, model),
                                asked or resolve_device(config.device), rates_png, tokens_png, _decision_words(method))
    if len(written) == 1:
        print("tokens are merged in this model, so they no longer map to patches: no active-token picture")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _decision_words(method) -> tuple[str, str]:
    """What show-tokens calls a decision and its tokens: a method whose cost follows the images (DyT's
    dispatchers) leaves tokens active or idle; a pruning method keeps a share of them at each location."""
    return ("dispatcher", "active") if method.data_dependent_cost else ("location", "kept")


def _over_the_grid(masks, grid: tuple[int, int]) -> bool:
    """Whether every mask covers the patch grid (a pruning method's do; DyT's after a merge cover fewer tokens)."""
    return all(mask.shape[1] == grid[0] * grid[1] for mask in masks)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tieta", description="Parameter- and token-efficient fine-tuning of timm ViTs.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune a ViT on a task folder and write a run folder")
    _add_config_arguments(train, data_required=False)
    train.add_argument("--output", type=Path, help="run folder to create")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run in --output (it stays until the new run's first checkpoint)")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR",
                       help="continue a killed, interrupted or failed run from its last epoch, exactly")
    _add_schedule_arguments(train)
    train.add_argument("--seed", type=int, help="random seed (default 0)")
    train.add_argument("--device", help="auto, cpu or cuda[:N] (default auto)")
    train.set_defaults(func=cmd_train)

    sweep = sub.add_parser("sweep", help="train tasks x methods x settings x seeds, one run folder each",
                           description="Train every cell of a grid into its own run folder: from a sweep file "
                           "(tasks, runs, seeds, base settings; see configs/) or from --data and --method. "
                           "Finished runs are skipped on a re-run; a failed run is reported and the rest go on.")
    sweep.add_argument("sweep_file", nargs="?", type=Path, help="sweep file (YAML), e.g. one of configs/")
    sweep.add_argument("--output", required=True, type=Path, help="sweep folder (run folders and sweep.yaml)")
    sweep.add_argument("--root", help="folder holding the task folders (replaces the sweep file's root)")
    sweep.add_argument("--tasks", nargs="+", metavar="NAME", help="only these tasks of the sweep file")
    sweep.add_argument("--runs", nargs="+", metavar="NAME", help="only these runs of the sweep file")
    sweep.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the sweep file's, or 0)")
    sweep.add_argument("--devices", help="comma-separated devices, one run on each at a time, e.g. cuda:0,cuda:1 "
                       "(default: the base settings' device, else auto, in this process)")
    sweep.add_argument("--device", help="one device for every run, in this process, as train's --device (the same "
                       "as --devices with one device)")
    _add_config_arguments(sweep, data_required=False, grid=True)
    _add_schedule_arguments(sweep)
    sweep.set_defaults(func=cmd_sweep)

    report = sub.add_parser("report", help="report.md, report.csv and plots of a sweep's runs",
                            description="Per-task top-1 (final and best), group means, their mean and the mean "
                            "over tasks, cost and throughput (the sweep's models timed side by side), with "
                            "accuracy-vs-throughput and accuracy-vs-GMACs plots and their Pareto front.")
    report.add_argument("folder", type=Path, help="a sweep folder (or any folder of run folders)")
    report.add_argument("--output", type=Path, help="where to write (default: the folder itself)")
    report.add_argument("--no-bench", action="store_true", help="skip the throughput benchmark")
    report.add_argument("--rebench", action="store_true", help="time again even if a measurement is kept")
    report.add_argument("--device", default="cpu", help="device for the throughput benchmark (default cpu)")
    report.add_argument("--batch-size", type=_positive_int, default=32, help="benchmark batch (default 32)")
    report.add_argument("--rounds", type=_positive_int, default=7,
                        help=f"interleaved timing rounds (default 7; with fewer than {RELIABLE_ROUNDS} the reading "
                        "ranks no speeds)")
    report.add_argument("--budget", metavar="KIND=VALUE",
                        help="name the most accurate run within a budget and mark it on the plots: speedup=2 (x the "
                        "first run), latency=5ms (one pass of the timed batch), throughput=800 (img/s) or gmacs=8.8")
    report.set_defaults(func=cmd_report)

    evaluate = sub.add_parser("eval", help="evaluate a trained checkpoint")
    evaluate.add_argument("run", type=Path, help="a run folder or its checkpoint.safetensors")
    evaluate.add_argument("--data", help="task folder (default: the one it was trained on)")
    evaluate.add_argument("--split", help="split to evaluate (default: the run's eval split, test)")
    evaluate.add_argument("--batch-size", type=_positive_int, help="evaluation batch size")
    evaluate.add_argument("--json", action="store_true", help="print the raw result as JSON instead of a table")
    evaluate.add_argument("--device", help="auto, cpu or cuda[:N] (default: the run's own device setting)")
    evaluate.add_argument("--best", action="store_true", help="the best epoch's tensors (checkpoint_best.safetensors "
                          "of the run folder) instead of the final ones")
    evaluate.set_defaults(func=cmd_eval)

    importer = sub.add_parser("import", help=codes.SUMMARY, description=codes.DESCRIPTION)
    importer.add_argument("file", type=Path, help="the reference checkpoint (.pth, .pt, .bin or .safetensors)")
    importer.add_argument("--from", dest="kind", required=True, choices=codes.CODES, help=codes.FROM_HELP)
    importer.add_argument("--output", required=True, type=Path, help="run folder to create")
    importer.add_argument("--model", help="timm model it was trained on (default vit_base_patch16_224)")
    importer.add_argument("--num-classes", type=_positive_int, help="classes of its head (checked, read from the head)")
    importer.add_argument("--data", help="the task folder it was trained on (recorded for tieta eval; classes checked)")
    importer.add_argument("--img-size", type=_positive_int,
                          help="input resolution it was trained at (default: its saved arguments', else the model's)")
    importer.add_argument("--schedule", type=_argument_type(catalog.parse_schedule_flag), help=codes.SCHEDULE_HELP)
    importer.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="another run setting, e.g. --set data.normalization=inception (repeatable)")
    importer.add_argument("--overwrite", action="store_true", help="replace the run in --output")
    importer.set_defaults(func=cmd_import)

    export = sub.add_parser("export", help="the trained model, LoRA folded in, as safetensors + JSON for tieta.load",
                            description="Write a finished run's inference model to a folder: model.safetensors "
                            "(every tensor: backbone with LoRA folded in, adapters, token-reduction modules, head) "
                            "and tieta_export.json (how to rebuild it). tieta.load(folder) gives the trained "
                            "model's logits with torch, timm and tieta only.")
    export.add_argument("run", type=Path, help="a finished run folder")
    export.add_argument("--output", type=Path, required=True, help="export folder to create")
    export.add_argument("--overwrite", action="store_true", help="replace the files of an existing export")
    export.add_argument("--best", action="store_true", help="export the best epoch's model "
                        "(checkpoint_best.safetensors of the run folder) instead of the final one")
    export.add_argument("--onnx", action="store_true", help="also write model.onnx, checked with onnxruntime "
                        "(needs tieta[onnx])")
    export.add_argument("--onnx-batch-size", type=_positive_int, default=1,
                        help="the ONNX file's fixed batch size (default 1)")
    export.add_argument("--format", choices=("tieta", "transformers"), default="tieta",
                        help="tieta (default: for tieta.load, any method) or transformers: a folder that "
                        "transformers loads as its own model class, for LoRA-only runs (needs tieta[transformers])")
    export.set_defaults(func=cmd_export)

    predictor = sub.add_parser("predict", help="classify image files or folders with a run or an export",
                               description="Top classes of each image (files, or folders searched recursively), "
                               "prepared as in training, in batches. Files that cannot be read are reported and "
                               "skipped. A segmentation model writes a label mask (a palette PNG of class indices, "
                               "the image's size) and an overlay picture per image into --output DIR.")
    predictor.add_argument("source", type=Path, help="a finished run folder or an export folder")
    predictor.add_argument("images", nargs="+", type=Path, help="image files or folders")
    predictor.add_argument("--top-k", type=_positive_int, default=5, help="classes per image (default 5)")
    predictor.add_argument("--batch-size", type=_positive_int, default=32, help="images per batch (default 32)")
    predictor.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    predictor.add_argument("--output", type=Path, help="write a CSV here instead of printing a table; for a "
                           "segmentation model, the folder its masks and overlays go into")
    predictor.add_argument("--overwrite", action="store_true", help="replace an existing --output file (or a mask or "
                           "overlay file of the same name that tieta did not write)")
    predictor.set_defaults(func=cmd_predict)

    checksum = sub.add_parser("checksum", help="verify the checksum of tieta's safetensors files, or add one",
                              description="Verify the SHA-256 that tieta stores in its checkpoints and exports. "
                              "tieta refuses a file without one; --write adds one to a file you trust (written by "
                              "an older tieta, or converted by hand). A file whose checksum does not match is "
                              "never rewritten.")
    checksum.add_argument("files", nargs="+", type=Path, help="checkpoint.safetensors, progress.safetensors or an "
                          "export's model.safetensors")
    checksum.add_argument("--write", action="store_true", help="add a checksum where a file has none")
    checksum.set_defaults(func=cmd_checksum)

    flops = sub.add_parser("flops", help="per-image GMACs and parameters of a configured model")
    _add_config_arguments(flops, data_required=None)
    flops.add_argument("--num-classes", type=_positive_int, default=1000, help="classes of the head (default 1000)")
    flops.add_argument("--device", help="cpu or cuda[:N] for the counting pass (default cpu; the count is the same)")
    flops.set_defaults(func=cmd_flops)

    bench = sub.add_parser("bench", help="throughput of unpatched timm and the token-merging methods side by side")
    bench.add_argument("--model", default="vit_small_patch16_224", help="timm ViT name (default vit_small_patch16_224)")
    bench.add_argument("--img-size", type=_positive_int, help="input resolution (default: the model's)")
    bench.add_argument("--batch-size", type=_positive_int, default=32,
                       help="images per timed forward pass (or training step) (default 32)")
    bench.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                       help="fp32, or bf16 under autocast (default fp32)")
    bench.add_argument("--schedules", nargs="+", default=["low", "high"], choices=("low", "high"),
                       help="merge schedules (default low high)")
    bench.add_argument("--rounds", type=_positive_int, default=7,
                       help=f"interleaved timing rounds (default 7; fewer than {RELIABLE_ROUNDS} are not reliable)")
    bench.add_argument("--train", action="store_true",
                       help="time training steps of LoRA and of each merging method with LoRA")
    bench.add_argument("--suite", choices=list(SUITES), default=next(iter(SUITES)), help=suites_help())
    bench.add_argument("--frames", type=_positive_int,
                       help="time clips of this many frames (each model on every frame, then the attentive pooling "
                            "of a video model); default: images")
    bench.add_argument("--device", default="cpu", help="where to time: cpu, cuda or cuda:N (default cpu)")
    bench.add_argument("--output", type=Path, help="also write the rows as JSON here")
    bench.set_defaults(func=cmd_bench)

    planner = sub.add_parser("plan", help="each token-reduction method's setting that meets a speed or cost target "
                             "on this device, measured; writes a sweep file of those settings",
                             description="For every token-reduction method (or those named), search its knob for "
                             "the setting that meets the target: GMACs counted, or speed timed beside the "
                             "unmodified model in interleaved rounds. Prints each setting with what it measured and "
                             "writes a sweep file of them for tieta sweep.")
    planner.add_argument("--model", required=True, help="timm ViT name, e.g. vit_small_patch16_224")
    planner.add_argument("--weights", help="weights to time with and to train from (as for tieta train; default: "
                         "random for the timing, and the sweep file leaves timm's published weights)")
    planner.add_argument("--img-size", type=_positive_int, help="input resolution (default: the model's)")
    planner.add_argument("--target", required=True, metavar="KIND=VALUE",
                         help="speedup=2 (x the unmodified model), latency=5ms (one forward pass of the batch), "
                         "throughput=800 (img/s) or gmacs=8.8 (per image)")
    planner.add_argument("--batch-size", type=_positive_int, default=32, help="images per timed pass (default 32)")
    planner.add_argument("--device", default="cpu", help="where to time: cpu, cuda or cuda:N (default cpu)")
    planner.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="fp32, or bf16 autocast")
    planner.add_argument("--methods", nargs="+", metavar="NAME",
                         help="token-reduction methods to plan (default: every one of the registry)")
    planner.add_argument("--rounds", type=_positive_int, default=5, help="interleaved rounds of each timing "
                         f"(default 5; fewer than {RELIABLE_ROUNDS} is a smoke test)")
    planner.add_argument("--output", type=Path, help="write the sweep file (YAML) here")
    planner.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    planner.set_defaults(func=cmd_plan)

    show = sub.add_parser("show-merges", help="paint each final token's patch group over a few images (PNG)")
    _add_config_arguments(show, data_required=False)
    show.add_argument("--run", type=Path, help="a trained run folder (its model, schedule and data)")
    _add_image_sample_arguments(show, "replace an existing merges.png")
    show.add_argument("--output", type=Path, default=Path("."),
                      help=f"folder for {MERGES_PNG} (default .), as show-tokens; a path ending in .png is still "
                      "taken as the file (deprecated)")
    show.add_argument("--device", help="auto, cpu or cuda[:N] (default: the run's device setting, else auto)")
    show.set_defaults(func=cmd_show_merges)

    tokens = sub.add_parser("show-tokens", help="token decisions (a skipping method's active tokens, a pruning method's kept "
                            "patches): the share per layer or location, and the tokens over images (PNGs)")
    tokens.add_argument("run", type=Path, help="a trained run folder of a method with token decisions")
    tokens.add_argument("--data", help="task folder for the images (default: the run's)")
    tokens.add_argument("--clip", type=Path, help="a video run's clip to draw (default: the split's first clip)")
    _add_image_sample_arguments(tokens, "replace existing PNGs")
    tokens.add_argument("--output", type=Path, default=Path("."),
                        help="folder for activation_rates.png and active_tokens.png (default .)")
    tokens.add_argument("--device", help="auto, cpu or cuda[:N] (default: the run's device setting)")
    tokens.set_defaults(func=cmd_show_tokens)

    demo = sub.add_parser("demo", help="the built-in default: fine-tune on offline assets (no arguments needed)")
    demo.add_argument("--output", type=Path, help="folder for the run folders (default: a new one under $TIETA_HOME/demo)")
    demo.add_argument("--epochs", type=_positive_int, help="training epochs per method (default 2)")
    demo.add_argument("--device", help="auto, cpu or cuda[:N] for training and timing (default: auto for training, "
                      "cpu for timing)")
    demo.set_defaults(func=cmd_demo)
    return parser


def _tolerate_any_locale() -> None:
    """Never end a command for a character the terminal cannot take: under an ASCII locale
    (LC_ALL=C) the "±" and "·" tieta prints become "?"; on UTF-8, a file name that is not UTF-8 is
    printed with its own bytes (as ``ls`` does)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            utf8 = (stream.encoding or "").lower().replace("-", "") == "utf8"
            stream.reconfigure(errors="surrogateescape" if utf8 else "replace")


def parse_arguments(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``build_parser().parse_args``, but an argument no subcommand knows is reported with that
    subcommand's usage (``usage: tieta train ...``), as its other errors are, not with tieta's."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        subcommands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
        subcommands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    _tolerate_any_locale()
    try:
        try:
            args = parse_arguments(argv)
            return args.func(args)
        finally:
            # output to a pipe is buffered: a reader that has gone shows up here, not at interpreter exit
            sys.stdout.flush()
    except TietaError as error:
        print(f"tieta: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tieta: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader stopped early (`tieta ... | head`): end quietly, as the Python docs advise; the
        # output still buffered goes to devnull so that the flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:  # the file system said no (no space, no permission, a file where a folder goes)
        where = f": {error.filename}" if error.filename else ""
        print(f"tieta: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``tieta`` command: thin subcommands over the Python surface.

Every subcommand turns bad input into one sentence on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from tieta.errors import TietaError

# command-line flag -> config key, for the general settings people change most (each method
# declares its own flags in the registry)
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


def _method_flags() -> dict[str, Any]:
    """argparse dest -> the registry's Flag, for every method's flags."""
    from tieta.methods import registry

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


def _add_config_arguments(parser: argparse.ArgumentParser, data_required: bool) -> None:
    parser.add_argument("--config", type=Path, help="YAML file of settings (command-line flags override it)")
    parser.add_argument("--model", help="timm model name (default vit_base_patch16_224)")
    parser.add_argument("--weights", help="weights file (.safetensors/.pth/.bin/.npz), 'random', or "
                        "'dinov2_vits14_saliency'; default: timm's published weights from the hub")
    from tieta.methods import registry

    parser.add_argument("--method", help=f"methods joined by '+': {', '.join(registry.METHODS)}, e.g. pyra+lora "
                        "(default lora)")
    parser.add_argument("--img-size", type=int, help="input resolution (default: the model's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config setting, e.g. --set optim.lr_groups.head=1e-2 (repeatable)")
    for flag in registry.flags():
        long_list = flag.choices is not None and len(flag.choices) > 6  # named in the help, not the usage line
        parser.add_argument(flag.option, type=_argument_type(flag.parse), choices=flag.choices, help=flag.help,
                            metavar="NAME" if long_list else None)
    if data_required is not None:
        parser.add_argument("--data", required=data_required, help="task folder: VTAB-1k layout or train/<class>/ folders")


def _add_image_sample_arguments(parser: argparse.ArgumentParser, overwrite_help: str) -> None:
    parser.add_argument("--split", default="test", help="split to take images from (default test)")
    parser.add_argument("--count", type=int, default=4, help="number of images (default 4)")
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)


def _config_from(args: argparse.Namespace):
    from tieta.train.config import load_config, parse_override

    overrides: dict[str, Any] = {}
    keys = {**FLAG_KEYS, **{dest: flag.key for dest, flag in _method_flags().items()}}
    for dest, key in keys.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "bf16", False):
        overrides["bf16"] = True
    overrides.update(dict(parse_override(item) for item in args.set))
    return load_config(args.config, overrides)


def _print_summary(rows: list[dict[str, Any]], demo: bool = False) -> None:
    from tieta.report.tables import DEMO_COLUMNS, SUMMARY_COLUMNS, format_table

    print(format_table(rows, DEMO_COLUMNS if demo else SUMMARY_COLUMNS))


def cmd_train(args: argparse.Namespace) -> int:
    from tieta.train.fit import fit

    config = _config_from(args)
    summary = fit(config, args.output, overwrite=args.overwrite)
    _print_summary([summary])
    print(f"run folder: {args.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tieta.train.fit import evaluate_checkpoint

    result = evaluate_checkpoint(args.run, args.data, args.split, args.batch_size)
    print(json.dumps(result, indent=2))
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    import torch

    from tieta.measure.flops import count_flops
    from tieta.methods.params import trainable_parameters
    from tieta.report.tables import fact_label
    from tieta.train.fit import describe_methods, image_size_of
    from tieta.train.model import build_model

    config = _config_from(args)
    model = build_model(config, args.num_classes, random_weights=True)  # costs do not depend on weights
    size = image_size_of(model)
    flops = count_flops(model, torch.randn(1, 3, size, size))
    trainable, total = trainable_parameters(model)
    print(f"{config.model} + {config.method} at {size} px, per image:")
    print(f"  GMACs (the field's GFLOPs, MACs/1e9): {flops['gmacs']:.3f}")
    print(f"  GFLOPs in the PYRA paper's unit (MACs/2^30): {flops['pyra_gflops']:.3f}")
    print(f"  parameters: {total:,} ({trainable:,} trainable, {100 * trainable / total:.3f}%)")
    for key, value in describe_methods(model, config).items():
        print(f"  {fact_label(key)}: {value}")
    dependent = [method.name for method in config.method_list if method.data_dependent_cost]
    if dependent:
        print(f"  {', '.join(dependent)}: the cost depends on the images and the trained weights; this is one random "
              "image with untrained ones; a trained run's summary.json counts the executed path on real test images")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tieta.demo import default_output, run_demo

    output = args.output or default_output()
    summaries = run_demo(output, args.epochs)
    print()
    from tieta.demo import BENCH_BATCH_SIZE, DEMO_SETTINGS

    print(f"tieta demo: DINOv2 ViT-S/14 (saliency-tuned) on ELPV solar cells, 4 classes, {DEMO_SETTINGS['img_size']} px, "
          f"{summaries[0]['device']}; PYRA at the '{DEMO_SETTINGS['merge.schedule']}' merge schedule, "
          f"DyT with MLP dispatch (rho 0.5)")
    print(f"eval img/s and speedup measured side by side at batch {BENCH_BATCH_SIZE}")
    _print_summary(summaries, demo=True)
    print(f"run folders: {output}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tieta.measure.bench_suite import run_suite
    from tieta.report.tables import bench_columns, format_table

    rows = run_suite(args.model, args.img_size, args.batch_size, args.dtype, args.schedules, args.rounds,
                     args.train, args.device)
    kind = "training steps" if args.train else "evaluation"
    print(f"{args.model}, {kind}, batch {args.batch_size}, {args.dtype}, {args.device}, "
          f"median of {args.rounds} interleaved rounds (speedup: per-round ratio to the first row)")
    print(format_table(rows, bench_columns(rows, efficiency=not args.train)))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
        args.output.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    return 0


def cmd_show_merges(args: argparse.Namespace) -> int:
    from tieta.report.visualize import merge_groups, save_merge_figure
    from tieta.train.fit import image_size_of, load_run_model, seed_everything
    from tieta.train.model import build_model

    if args.output.exists() and not args.overwrite:
        raise TietaError(f"{args.output} already exists; pick another path or pass --overwrite")
    if args.run is not None:
        model, config, _ = load_run_model(args.run)
        if getattr(model, "token_state", None) is None:
            raise TietaError(f"the run {args.run} merges no tokens (method {config.method})")
    else:
        if args.data is None:
            raise TietaError("give --data (a task folder) for the images to show, or --run")
        config = _config_from(args)
        if not {"tome", "pyra"} & set(config.methods):
            config.method = "tome"
        seed_everything(config.seed)
        model = build_model(config, num_classes=1000)
    images, inputs, names = _sample_images(args.data or config.data.path, args.split, args.count,
                                           image_size_of(model), config.data.normalization)
    groups = merge_groups(model, inputs)
    caption = f"{config.model} + {config.method}, r per block {getattr(model, 'token_schedule', [])}"
    save_merge_figure(images, groups, args.output, names, caption)
    print(f"wrote {args.output}")
    return 0


def _sample_images(task_dir: str, split: str, count: int, image_size: int, normalization: str):
    """A few evenly spaced images of a split: (uint8 images, normalised images, their paths)."""
    import torch

    from tieta.data.transforms import Normalize
    from tieta.data.vtab import ImageDataset, open_task

    items = open_task(task_dir).split(split)
    chosen = items[:: max(1, len(items) // count)][:count]
    dataset = ImageDataset(chosen, image_size, max(label for _, label in chosen) + 1, cache=True)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return images, Normalize(normalization)(images), [path.name for path, _ in chosen]


def cmd_show_tokens(args: argparse.Namespace) -> int:
    from tieta.methods.dyt import evaluation_masks
    from tieta.report.visualize import save_active_tokens, save_rate_chart
    from tieta.train.fit import image_size_of, load_run_model

    rates_png, tokens_png = args.output / "activation_rates.png", args.output / "active_tokens.png"
    for path in (rates_png, tokens_png):
        if path.exists() and not args.overwrite:
            raise TietaError(f"{path} already exists; pick another --output or pass --overwrite")
    model, config, _ = load_run_model(args.run)
    if getattr(model, "dispatch_state", None) is None:
        raise TietaError(f"the run {args.run} has no DyT dispatchers (method {config.method})")
    images, inputs, names = _sample_images(args.data or config.data.path, args.split, args.count,
                                           image_size_of(model), config.data.normalization)
    masks = evaluation_masks(model, inputs)
    rates = [float(mask.float().mean()) for mask in masks]
    caption = f"{config.model} + {config.method} ({config.dyt.variant} dispatch), {len(names)} {args.split} images"
    save_rate_chart(rates, rates_png, caption)
    written = [rates_png]
    if getattr(model, "token_state", None) is None:
        layers = sorted({round(i * (len(masks) - 1) / 3) for i in range(4)})
        save_active_tokens(images, masks, tuple(model.patch_embed.grid_size), tokens_png, layers, caption)
        written.append(tokens_png)
    else:
        print("tokens are merged in this model, so they no longer map to patches: no active-token picture")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tieta", description="Parameter- and token-efficient fine-tuning of timm ViTs.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune a ViT on a task folder and write a run folder")
    _add_config_arguments(train, data_required=False)
    train.add_argument("--output", required=True, type=Path, help="run folder to create")
    train.add_argument("--overwrite", action="store_true", help="reuse an existing run folder")
    train.add_argument("--epochs", type=int, help="training epochs (default 100)")
    train.add_argument("--warmup-epochs", type=int, help="linear warm-up epochs (default 10)")
    train.add_argument("--lr", type=float, help="base learning rate (default 1e-3)")
    train.add_argument("--batch-size", type=int, help="training batch size (default 64)")
    train.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 1e-4)")
    train.add_argument("--eval-every", type=int, help="epochs between evaluations (default 1)")
    train.add_argument("--seed", type=int, help="random seed (default 0)")
    train.add_argument("--device", help="auto, cpu or cuda[:N] (default auto)")
    train.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a trained checkpoint")
    evaluate.add_argument("run", type=Path, help="a run folder or its checkpoint.safetensors")
    evaluate.add_argument("--data", help="task folder (default: the one it was trained on)")
    evaluate.add_argument("--split", help="split to evaluate (default: the run's eval split, test)")
    evaluate.add_argument("--batch-size", type=int, help="evaluation batch size")
    evaluate.set_defaults(func=cmd_eval)

    flops = sub.add_parser("flops", help="per-image GMACs and parameters of a configured model")
    _add_config_arguments(flops, data_required=None)
    flops.add_argument("--num-classes", type=int, default=1000, help="classes of the head (default 1000)")
    flops.set_defaults(func=cmd_flops)

    bench = sub.add_parser("bench", help="throughput of unpatched timm, ToMe and PYRA side by side")
    bench.add_argument("--model", default="vit_small_patch16_224", help="timm ViT name (default vit_small_patch16_224)")
    bench.add_argument("--img-size", type=int, help="input resolution (default: the model's)")
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    bench.add_argument("--schedules", nargs="+", default=["low", "high"], help="merge schedules (default low high)")
    bench.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
    bench.add_argument("--train", action="store_true", help="time training steps of LoRA, ToMe+LoRA, PYRA+LoRA")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--output", type=Path, help="also write the rows as JSON here")
    bench.set_defaults(func=cmd_bench)

    show = sub.add_parser("show-merges", help="paint each final token's patch group over a few images (PNG)")
    _add_config_arguments(show, data_required=False)
    show.add_argument("--run", type=Path, help="a trained run folder (its model, schedule and data)")
    _add_image_sample_arguments(show, "replace an existing PNG")
    show.add_argument("--output", type=Path, default=Path("merges.png"), help="PNG to write (default merges.png)")
    show.set_defaults(func=cmd_show_merges)

    tokens = sub.add_parser("show-tokens", help="DyT: activation rate per layer and active tokens over images (PNGs)")
    tokens.add_argument("run", type=Path, help="a trained DyT run folder")
    tokens.add_argument("--data", help="task folder for the images (default: the run's)")
    _add_image_sample_arguments(tokens, "replace existing PNGs")
    tokens.add_argument("--output", type=Path, default=Path("."), help="folder for the two PNGs (default .)")
    tokens.set_defaults(func=cmd_show_tokens)

    demo = sub.add_parser("demo", help="the built-in default: fine-tune on offline assets (no arguments needed)")
    demo.add_argument("--output", type=Path, help="folder for the run folders (default: a new one under $TIETA_HOME/demo)")
    demo.add_argument("--epochs", type=int, help="training epochs per method (default 2)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TietaError as error:
        print(f"tieta: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tieta: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

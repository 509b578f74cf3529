"""fit: a whole fine-tuning run from a RunConfig to a run folder, and evaluate_checkpoint."""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, Subset
from tqdm.auto import tqdm

from tieta.data.augment import AugmentedImages, training_transform
from tieta.data.given import GIVEN, GivenImages, count_classes, given_task
from tieta.data.normalization import described, interpolation_of
from tieta.data.transforms import Normalize
from tieta.data.vtab import ImageDataset, Task, open_task
from tieta.device import resolve_device
from tieta.errors import TietaError
from tieta.measure.flops import count_flops
from tieta.measure.throughput import measure_throughput
from tieta.methods.method import LossFn
from tieta.methods.params import trainable_parameters
from tieta.train.checkpoint import save_checkpoint, trained_state
from tieta.train import distributed
from tieta.train.config import (RunConfig, comparable, first_difference, group_learning_rates, load_config, validate,
                                warmup_warning, with_warmup)
from tieta.train import loggers
from tieta.train.loop import (autocast_dtype, check_finite, cross_entropy_step, evaluate, smoothed_cross_entropy_step,
                              train_one_epoch)
from tieta.train.model import build_model, image_size_of, seed_everything
from tieta.video.model import frame_backbone
from tieta.train.video_run import (cost_inputs, is_video_run, open_run_task, video_datasets, video_eval_dataset,
                                   with_data_kind)
from tieta.dense.dataset import SegmentationTask
from tieta.dense.model import segmentation_step
from tieta.train.segmentation_run import SCORES as SEGMENTATION_SCORES
from tieta.train.segmentation_run import (cost_crops, evaluate_segmentation, is_segmentation_run, score_fields,
                                          segmentation_datasets, segmentation_eval_dataset, task_fingerprint)
from tieta.train.run_model import load_run_model
from tieta.train.optim import build_optimizer, lr_multiplier
from tieta.train.progress import Progress, load_progress, read_record, save_progress
from tieta.train.record import fresh, run_normalization, with_record
from tieta.train.reading import lr_reached_base, majority_accuracy
from tieta.train.rundir import (CHECKPOINT_BEST, CONFIG, FAILED, FINISHED, INTERRUPTED, PROGRESS, RunDir,
                                read_state, strict_json)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator | int,
                num_workers: int, processes: distributed.Processes = distributed.SINGLE) -> DataLoader:
    """Batches of ``dataset``, shuffled by ``generator`` (a seed makes a fresh one); with several
    processes, each gets its shard of every global batch of ``batch_size``.

    The shuffle draws from ``generator`` as ``DataLoader(shuffle=True, generator=...)`` does, so
    saving its state after an epoch is saving the sampler's position.
    """
    if not isinstance(generator, torch.Generator):
        generator = torch.Generator().manual_seed(generator)
    order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    batches = BatchSampler(order, batch_size, drop_last=False)
    if processes.parallel:
        batches = distributed.ShardedBatches(batches, processes)
    return DataLoader(dataset, batch_sampler=batches, generator=generator, num_workers=num_workers)


def measure_cost(model: nn.Module, config: RunConfig, dataset: ImageDataset, normalize: nn.Module,
                 device: torch.device, batch_size: int, flops_images: int = 64) -> dict[str, Any]:
    """GMACs (and the PYRA paper's MACs/2^30) per image, averaged over real evaluation images (the
    executed path can depend on them), evaluation throughput, and what each method measures on
    those images."""
    step = max(1, len(dataset) // flops_images)
    indices = list(range(0, len(dataset), step))[:flops_images]
    size = image_size_of(model)
    # a video run's: clips, a view of each; a segmentation run's: one window of each image
    inputs = cost_crops(dataset, indices, size) if is_segmentation_run(config) else cost_inputs(dataset, indices)
    sample = normalize(inputs.to(device))
    flops = count_flops(model, sample)
    # real images: where a method's path depends on them (DyT), so does the speed
    throughput = measure_throughput(model, size, batch_size, device, autocast_dtype(config.precision),
                                    images=sample[:batch_size])
    cost = {"gmacs": flops["gmacs"], "pyra_gflops": flops["pyra_gflops"], "eval_images_per_s": throughput,
            "throughput_batch_size": batch_size}
    for method in config.method_list:
        if method.measure is not None:
            cost.update(method.measure(model, sample))
    return cost


def training_objective(config: RunConfig) -> LossFn:
    """Cross-entropy (with ``optim.label_smoothing``), or the loss of the method that brings its own
    (validate allows one, and no smoothing with it); a segmentation run's: the pixel loss and the
    methods' dense terms (DyT's rate loss)."""
    if is_segmentation_run(config):
        return segmentation_step
    for method in config.method_list:
        if method.objective is not None:
            return method.objective(config)
    if config.optim.label_smoothing:
        return smoothed_cross_entropy_step(config.optim.label_smoothing)
    return cross_entropy_step


def epoch_updates(model: nn.Module, config: RunConfig, epoch: int) -> dict[str, Any]:
    """Apply every method's per-epoch schedule (a temperature, a keep rate); returns what to log."""
    values: dict[str, Any] = {}
    for method in config.method_list:
        if method.epoch_update is not None:
            values.update(method.epoch_update(frame_backbone(model), config, epoch, config.optim.epochs))
    return values


def describe_methods(model: nn.Module, config: RunConfig) -> dict[str, Any]:
    """What each method says about the built model (a merge schedule, tokens per block)."""
    facts: dict[str, Any] = {}
    for method in config.method_list:
        if method.describe is not None:
            facts.update(method.describe(frame_backbone(model)))  # a video or segmentation model's: its ViT's
    return facts


def _needed_bytes(model: nn.Module) -> int:
    """Disk a run needs: the progress checkpoint (tensors, the best epoch's and two AdamW moments)
    and the final one, each written beside the file it replaces, and the best epoch's, plus room
    for the logs."""
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return 2 * (4 * trained + trained) + trained + 2**20


def _estimate_seconds(started: float, done: int, first: int, total: int) -> float:
    return (time.perf_counter() - started) / max(1, done - first) * (total - done)


def fit(config: RunConfig, output: str | Path, overwrite: bool = False, label: Optional[str] = None,
        resume: bool = False, *, train: Optional[Dataset] = None, test: Optional[Dataset] = None,
        num_classes: Optional[int] = None) -> dict[str, Any]:
    """Fine-tune as configured, evaluate, and write the run folder. Returns the summary.

    Args:
        overwrite: replace the run in ``output`` (it stays until the new run's first checkpoint).
        label: prefixes the progress lines (e.g. a sweep's "task · run · seed").
        resume: continue the run in ``output`` from its last checkpointed epoch (``config`` must be
            the run's own, as :func:`resume_run` reads it).
        train, test: torch Datasets of (PIL image or (3, H, W) tensor, int label) to train and
            evaluate on, in place of ``data.path`` (tieta.data.given); both or neither.
        num_classes: with ``train``: by default ``len(train.classes)`` where it has them, else the
            largest training label + 1.

    The run folder (``tieta.train.rundir``) gets config.yaml, metrics.jsonl (one line per epoch),
    a resumable checkpoint after every epoch, and at the end checkpoint.safetensors (trained
    tensors only), checkpoint_best.safetensors (those of the epoch with the best top-1) and
    summary.json; the loggers of ``log`` (``tieta.train.loggers``) get every epoch. Started by
    ``torchrun``, the processes train data-parallel (``tieta.train.distributed``) and the first
    one writes.
    """
    validate(config)
    config = with_data_kind(config)  # images or clips, as data.path holds (tieta.train.video_run)
    config = with_warmup(config)  # a warm-up left unset follows the rule (tieta.train.config)
    if not resume:  # a new run records its own inputs (tieta.train.record)
        config = fresh(config)
    given = _given_datasets(config, train, test, num_classes)
    if config.data.path is None and given is None:
        raise TietaError("no data given: set data.path (or --data) to a task folder")
    processes, device_name = distributed.join(config.device)
    try:
        return _fit(config, Path(output), overwrite, label, resume, processes, device_name, given)
    finally:
        distributed.leave(processes)


def _given_datasets(config: RunConfig, train: Optional[Dataset], test: Optional[Dataset],
                    num_classes: Optional[int]) -> Optional[tuple[Dataset, Dataset, Optional[int]]]:
    """(train, test, num_classes) where fit was given torch Datasets, else None (then data.path)."""
    if train is None and test is None:
        if num_classes is not None:
            raise TietaError("num_classes goes with train and test datasets; a task folder has its own classes")
        return None
    if train is None or test is None:
        raise TietaError(f"fit was given a {'train' if test is None else 'test'} dataset but no "
                         f"{'test' if test is None else 'train'} one: give both")
    if config.data.path is not None:
        raise TietaError(f"fit was given datasets and data.path ({config.data.path}): give one of them")
    return train, test, num_classes


def open_data(config: RunConfig, device: torch.device,
              given: Optional[tuple[Dataset, Dataset, Optional[int]]] = None
              ) -> tuple[RunConfig, Task, nn.Module, Dataset, Dataset]:
    """(the config with the run's record, the task, the model built for its classes, the training
    images, the evaluation images), from data.path or from given torch Datasets; the training images
    augmented as data.augment says, every image resized with the filter of the run's normalisation."""
    if given is None:
        task: Optional[Task] = (open_run_task(config) if is_video_run(config) or is_segmentation_run(config) else
                                open_task(config.data.path, config.data.holdout))
        classes = task.num_classes
    else:
        task, classes = None, count_classes(given[0], given[2])
    seed_everything(config.seed)
    model = build_model(config, classes).to(device)
    config = with_record(config, model)  # the numbers data.normalization stands for, the backbone's identity
    normalization = run_normalization(config)
    size, interpolation = image_size_of(model), interpolation_of(normalization)
    # RandAugment fills with the mean colour; the augmented uint8 images are normalised per batch as every image is
    augment = training_transform(config.data.augment, size, normalization["mean"], normalization["std"])
    if task is None:
        train_set = GivenImages(given[0], "train", size, classes, augment, "decoding train images", interpolation)
        eval_set = GivenImages(given[1], "test", size, classes, None, "decoding eval images", interpolation)
        return config, given_task(train_set, eval_set, classes), model, train_set, eval_set
    if is_video_run(config):  # clips: sampled and augmented as video_data says
        return (config, task, model, *video_datasets(config, task, size))
    if is_segmentation_run(config):  # image and mask pairs: mmseg's pipeline, as segmentation_data says
        return (config, task, model, *segmentation_datasets(config, task, size, normalization["mean"]))
    train_items = task.split(config.data.train_split)
    train_set = AugmentedImages(train_items, size, classes, augment) if augment is not None else \
        ImageDataset(train_items, size, classes, config.data.cache, "decoding train images", interpolation)
    eval_set = ImageDataset(task.split(config.data.eval_split), size, classes, config.data.cache,
                            "decoding eval images", interpolation)
    return config, task, model, train_set, eval_set


def _fit(config: RunConfig, output: Path, overwrite: bool, label: Optional[str], resume: bool,
         processes: distributed.Processes, device_name: str,
         given: Optional[tuple[Dataset, Dataset, Optional[int]]] = None) -> dict[str, Any]:
    started = time.perf_counter()
    run: Optional[RunDir] = None
    try:  # everything that can refuse the run, before the folder is touched
        loggers.check_available(config.log)  # a logger's missing package, before the folder is touched
        reasons = [method.one_process(config) for method in config.method_list if method.one_process]
        if is_segmentation_run(config):  # its pixel loss is a mean over one process's pixels (no shard.batch_mean)
            reasons.append("a segmentation run trains in one process; start it without torchrun")
        if processes.parallel and any(reasons):
            raise TietaError(next(reason for reason in reasons if reason))
        if processes.main:
            run = RunDir(output, overwrite, resume)
            run.check_writable()
        device = resolve_device(device_name)
        config, task, model, train_set, eval_set = open_data(config, device, given)
        if run is not None:
            run.check_writable(_needed_bytes(model))
            run.open()
        failure = None
    except (TietaError, OSError) as error:
        failure = error
    if not distributed.agree(failure is None, processes):
        if run is not None:
            run.close()
        if isinstance(failure, OSError):
            raise TietaError(f"cannot start the run: {failure}") from None
        raise failure or TietaError("another of the training processes could not start (see its message)")
    try:
        return _train(config, run, output, resume, task, model, train_set, eval_set, device, label, processes, started)
    except KeyboardInterrupt:
        if run is not None:
            _record_end(run, INTERRUPTED, "stopped by Ctrl-C or SIGTERM")
            tqdm.write(f"interrupted after epoch {run.epoch} of {config.optim.epochs}; to go on: tieta train --resume "
                       f"{output}", file=sys.stderr)
        raise
    except TietaError as error:
        if run is not None:
            _record_end(run, FAILED, str(error))
        raise
    except Exception as error:
        if run is not None:
            _record_end(run, FAILED, f"{type(error).__name__}: {error}")
        raise
    finally:
        if run is not None:
            run.close()


def _record_end(run: RunDir, state: str, reason: str) -> None:
    """Say in the run folder how the run ended (the disk may be why: then the message must do)."""
    try:
        run.set_state(state, reason, last_resort=True)
    except (OSError, TietaError):
        pass


class _TermAsInterrupt:
    """Within the block, SIGTERM (a scheduler ending the job) stops the run as Ctrl-C does, so that
    the folder says "interrupted" and the run can be resumed."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc_info):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _train(config: RunConfig, run: Optional[RunDir], output: Path, resume: bool, task: Task, model: nn.Module,
           train_set: ImageDataset, eval_set: ImageDataset, device: torch.device, label: Optional[str],
           processes: distributed.Processes, started: float) -> dict[str, Any]:
    normalize = Normalize(run_normalization(config)).to(device)
    optim = config.optim
    shuffle = torch.Generator().manual_seed(config.seed)
    train_loader = make_loader(train_set, optim.batch_size, True, shuffle, config.data.num_workers, processes)
    eval_part = Subset(eval_set, distributed.eval_indices(len(eval_set), processes))
    segmentation = is_segmentation_run(config)
    # a segmentation run's evaluation images keep their own sizes: one a batch
    eval_loader = make_loader(eval_part, 1 if segmentation else config.eval_batch_size, False,
                              torch.Generator().manual_seed(config.seed), config.data.num_workers)
    optimizer = build_optimizer(model, optim.lr, optim.weight_decay, group_learning_rates(config))
    global_sizes = distributed.global_batch_sizes(len(train_set), optim.batch_size)
    # the schedule counts optimizer steps: one per optim.grad_accum_steps batches (the last may have fewer)
    steps_per_epoch = math.ceil(len(global_sizes) / optim.grad_accum_steps)
    total_steps, warmup_steps = optim.epochs * steps_per_epoch, optim.warmup_epochs * steps_per_epoch
    min_ratio = optim.min_lr / optim.lr

    def lr_at(step: int) -> float:
        return lr_multiplier(step, total_steps, warmup_steps, min_ratio, optim.schedule)

    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    tf32 = use_tf32(device)
    resolved = config.to_dict()
    resolved["data"]["path"] = None if getattr(task, "source", None) == GIVEN else task.data_path
    data_print = task_fingerprint(task, ("train", "test") if getattr(task, "source", None) == GIVEN else
                                  (config.data.train_split, config.data.eval_split))
    progress = Progress(0, None)
    # the first process decides whether there is an epoch to resume from; all load it (a run folder
    # that several machines train into must be on a filesystem they all see)
    found = resume and processes.main and (output / PROGRESS).is_file()
    if resume and distributed.sum_over_processes([float(found)], processes)[0] > 0:
        progress = load_progress(output / PROGRESS, model, optimizer, shuffle, processes)
        if getattr(task, "source", None) == GIVEN and progress.data and progress.data != data_print:  # (a folder: resume_run checks)
            raise TietaError(f"the datasets given changed since the run in {output} started (then {progress.data}; "
                             f"now {data_print}); a resume needs the data it began with")
        if scaler is not None and progress.scaler is not None:
            scaler.load_state_dict(progress.scaler)
    if run is not None:
        warning = warmup_warning(config)
        if warning:
            tqdm.write(f"tieta: warning: {label + ': ' if label else ''}{warning}", file=sys.stderr)
        if not resume and run_normalization(config)["source"].startswith("imagenet ("):  # "model" found no numbers
            tqdm.write(f"tieta: note: {label + ': ' if label else ''}normalization: "
                       f"{described(run_normalization(config))}", file=sys.stderr)
        if resume:
            tqdm.write(f"resuming {output} after epoch {progress.epoch} of {optim.epochs}" if progress.epoch else
                       f"resuming {output} from its start (no epoch was checkpointed)")
        if progress.records is None:  # an older checkpoint: its epochs' lines as the log has them
            progress.records = run.read_metrics(progress.epoch)
        run.start(resolved, optim.epochs, progress.epoch)
        if resume:
            run.restore_metrics(progress.records)
    last = list(progress.records or [])
    best = progress.best
    # the best epoch's trained tensors: in every progress checkpoint, written as checkpoint_best at the end
    best_tensors = progress.best_tensors
    last_eval = next(({key: r.get(key) for key in ("acc", "top5", "balanced_acc", "eval_loss", *SEGMENTATION_SCORES)}
                      for r in reversed(last) if "acc" in r), None)
    logs = loggers.open_loggers(run.path if run is not None else None, config.log, progress.epoch, resolved)
    objective = training_objective(config)
    prefix = f"{label}: " if label else ""
    quiet = None if processes.main else True
    record: dict[str, Any] = last[-1] if last else {}
    training_started = time.perf_counter()
    with _TermAsInterrupt(), _closing(logs):
        for epoch in tqdm(range(progress.epoch, optim.epochs), desc=label or "epochs", disable=quiet,
                          initial=progress.epoch, total=optim.epochs):
            record = {"epoch": epoch + 1, **epoch_updates(model, config, epoch)}
            record.update(train_one_epoch(model, train_loader, normalize, optimizer, lr_at, epoch * steps_per_epoch,
                                          device, config.precision, optim.clip_grad, objective,
                                          f"epoch {epoch + 1}", processes, global_sizes, optim.grad_accum_steps,
                                          scaler))
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == optim.epochs:
                last_eval = (evaluate_segmentation(model, eval_loader, normalize, device, config.precision,
                                                   config.segmentation, processes=processes) if segmentation else
                             evaluate(model, eval_loader, normalize, device, config.precision, processes=processes))
                record.update(last_eval)
                if best is None or (last_eval["acc"] or 0.0) > (best["acc"] or 0.0):
                    best = {"acc": last_eval["acc"], "epoch": epoch + 1}
                    best_tensors = trained_tensors(model)
            last.append(strict_json(record))
            scaler_state = scaler.state_dict() if scaler is not None else None
            _save_epoch(run, record, model, optimizer, shuffle,
                        Progress(epoch + 1, best, last, resolved, data_print, scaler_state, best_tensors),
                        processes)
            if logs is not None:
                logs.log(last)
            shown = (f"{prefix}epoch {epoch + 1}/{optim.epochs}: loss {record['loss']:.4f}, "
                     f"{record['train_images_per_s']:.1f} img/s")
            if record.get("acc") is not None:
                shown += f", {config.data.eval_split} {'mIoU' if segmentation else 'acc'} {record['acc']:.2f}%"
            left = _estimate_seconds(training_started, epoch + 1, progress.epoch, optim.epochs)
            if processes.main:
                tqdm.write(shown + (f", about {left:.0f} s left" if left else ""))
    if not processes.main:
        distributed.barrier(processes)  # the first process measures and writes; the others are done
        return {}
    save_checkpoint(model, run.checkpoint, resolved, task.num_classes)
    if best_tensors is not None:  # None only after resuming a checkpoint of a tieta that did not keep them
        save_checkpoint(model, run.file(CHECKPOINT_BEST), resolved, task.num_classes, {"epoch": str(best["epoch"])},
                        tensors=best_tensors)
    trainable, total = trainable_parameters(model)
    summary = {
        "model": config.model,
        "weights": config.weights,
        "method": config.method,
        "data": task.data_path,
        "data_fingerprint": data_print,
        "num_classes": task.num_classes,
        "img_size": image_size_of(model),
        "acc": last_eval["acc"],
        # a classifier's top-5 and balanced accuracy; a segmentation run's mIoU, mAcc and aAcc
        **({"top5": last_eval.get("top5"), "balanced_acc": last_eval.get("balanced_acc")} if not segmentation else
           score_fields(last_eval)),
        "best_acc": best["acc"],
        "best_epoch": best["epoch"],
        # always answering the most frequent class (a segmentation run's pixels have no such score)
        "majority_acc": None if segmentation else majority_accuracy(eval_set.labels.tolist()),
        "lr_reached_base": lr_reached_base(optim.warmup_epochs, optim.epochs),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        **describe_methods(model, config),
        **measure_cost(model, config, eval_set, normalize, device, min(config.eval_batch_size, 32)),
        "train_images_per_s": record.get("train_images_per_s"),
        "device": str(device),
        "amp": config.precision,
        "tf32": tf32,
        "processes": processes.world,
        "wall_time_s": time.perf_counter() - started,
    }
    run.finish(summary)
    distributed.barrier(processes)
    return summary


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the trained tensors of ``model`` (those a checkpoint holds)."""
    return {name: p.detach().cpu().clone() for name, p in trained_state(model).items()}


def _save_epoch(run: Optional[RunDir], record: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                shuffle: torch.Generator, progress: Progress, processes: distributed.Processes) -> None:
    """Log the epoch and write its resumable checkpoint; if the first process cannot (a full disk),
    every process stops, and the checkpoint of the epoch before stays."""
    check_finite(model, f"after epoch {progress.epoch}")  # never checkpoint NaNs over the last good epoch
    failure = None
    try:
        if run is not None:
            run.log(record)
    except TietaError as error:
        failure = error
    try:
        save_progress(run.progress if run is not None else None, model, optimizer, shuffle, progress, processes)
    except TietaError as error:
        failure = failure or error
    if not distributed.agree(failure is None, processes):
        raise failure or TietaError("the first process could not write the checkpoint (see its message)")
    if run is not None:
        run.checkpointed(progress.epoch)


@contextlib.contextmanager
def _closing(logs: Optional[loggers.EpochLoggers]):
    """Close the loggers however the epochs end (their files are whole: each epoch flushes)."""
    try:
        yield
    finally:
        if logs is not None:
            logs.close()


def use_tf32(device: torch.device) -> bool:
    """Let float32 matmuls and convolutions use TF32 on CUDA (as timm's train.py does: Ampere and
    later GPUs run them several times faster, at a 10-bit mantissa); returns whether it is on."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    return True


def resume_run(folder: str | Path, device: Optional[str] = None, label: Optional[str] = None) -> dict[str, Any]:
    """Continue the killed, interrupted or failed run in ``folder`` from its last checkpointed epoch;
    it ends with the metrics an uninterrupted run would have had. Returns the summary.

    Args:
        device: run on another device than the run's own (then the numbers can differ in rounding).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TietaError(f"{folder} is not a run folder" + ("" if folder.exists() else " (it does not exist)"))
    state = read_state(folder)
    if state.state == FINISHED:
        raise TietaError(f"the run in {folder} has finished; there is nothing to resume")
    if state.state == "empty":
        raise TietaError(f"{folder} holds no run to resume (no {CONFIG})")
    config = load_config(folder / CONFIG, older=True)
    if device is not None:
        config.device = device
    check_unchanged(folder, config)
    return fit(config, folder, label=label, resume=True)


def check_unchanged(folder: Path, config: RunConfig) -> None:
    """Refuse to resume a run whose settings or data changed since its last checkpoint: the result
    would be neither the run that started nor a new one."""
    if not (folder / PROGRESS).is_file():
        return  # killed before its first checkpoint: it starts over with the settings it has now
    try:
        record = read_record(folder / PROGRESS)
    except TietaError:
        return  # a damaged checkpoint: fit reads it again, refuses it, and the run folder records why
    if record.settings is not None:
        difference = first_difference(comparable(record.settings), comparable(config.to_dict()))
        if difference:
            raise TietaError(f"{folder / CONFIG} was changed since the run started ({difference}); a resume continues "
                             "the run as it began: restore the setting, or train a new run into another folder")
    if record.data and config.data.path is not None:
        now = task_fingerprint(open_run_task(config), (config.data.train_split, config.data.eval_split))
        if now != record.data:
            raise TietaError(f"the task folder {config.data.path} changed since the run started (then {record.data}; "
                             f"now {now}); a resume needs the data it began with")


def evaluate_checkpoint(checkpoint: str | Path, data: Optional[str] = None, split: Optional[str] = None,
                        batch_size: Optional[int] = None, device: Optional[str] = None,
                        best: bool = False) -> dict[str, Any]:
    """Accuracy (top-1, top-5, balanced) and cost of a trained checkpoint on a split of a task (by
    default the run's own), on ``device`` (auto, cpu or cuda[:N]; by default the run's own);
    ``best``: the run folder's best epoch (checkpoint_best.safetensors)."""
    asked = resolve_device(device) if device is not None else None  # a device this machine lacks: before any work
    model, config, num_classes = load_run_model(checkpoint, best)
    device = asked or resolve_device(config.device)
    model.to(device)
    if data is None and config.data.path is None:
        raise TietaError(f"the run {checkpoint} was trained on datasets given to fit in Python: give the data to "
                         "evaluate on (--data)")
    # the run's held-out fraction goes with the run's own data (another source has its own, or refuses)
    task: Task = open_run_task(config, data)
    split = split or config.data.eval_split
    if is_segmentation_run(config):
        return _evaluate_segmentation_checkpoint(model, config, task, split, num_classes, device, batch_size)
    if task.layout == "video":  # each clip's views, their logits averaged
        dataset = video_eval_dataset(config, task, split, image_size_of(model), num_classes)
    else:
        dataset = ImageDataset(task.split(split), image_size_of(model), num_classes, config.data.cache,
                               interpolation=interpolation_of(run_normalization(config)))
    normalize = Normalize(run_normalization(config)).to(device)
    loader = make_loader(dataset, batch_size or config.eval_batch_size, False, config.seed, config.data.num_workers)
    result = evaluate(model, loader, normalize, device, config.precision)
    trainable, total = trainable_parameters(model)
    return {"method": config.method, "split": split, "acc": result["acc"], "top5": result["top5"],
            "balanced_acc": result["balanced_acc"], "eval_loss": result["eval_loss"],
            "images": len(dataset), "input_kind": "clip" if task.layout == "video" else "image",
            "majority_acc": majority_accuracy(dataset.labels.tolist()),
            "lr_reached_base": lr_reached_base(config.optim.warmup_epochs, config.optim.epochs),
            "trainable_percent": 100.0 * trainable / total,
            **measure_cost(model, config, dataset, normalize, device, min(batch_size or config.eval_batch_size, 32))}


def _evaluate_segmentation_checkpoint(model: nn.Module, config: RunConfig, task: SegmentationTask, split: str,
                                      num_classes: int, device: torch.device, batch_size: Optional[int]
                                      ) -> dict[str, Any]:
    """mIoU, mAcc and aAcc (%) of a segmentation run's model on a split, and its cost."""
    if task.num_classes > num_classes:
        raise TietaError(f"{task.data_path} has {task.num_classes} classes but the model scores {num_classes}; "
                         "evaluate it on a task of its own classes")
    dataset = segmentation_eval_dataset(config, task, split, run_normalization(config)["mean"])
    normalize = Normalize(run_normalization(config)).to(device)
    loader = make_loader(dataset, 1, False, config.seed, config.data.num_workers)
    result = evaluate_segmentation(model, loader, normalize, device, config.precision, config.segmentation)
    trainable, total = trainable_parameters(model)
    return {"method": config.method, "split": split, "acc": result["acc"], **score_fields(result),
            "images": len(dataset), "input_kind": "image", "majority_acc": None,
            "lr_reached_base": lr_reached_base(config.optim.warmup_epochs, config.optim.epochs),
            "trainable_percent": 100.0 * trainable / total,
            **measure_cost(model, config, dataset, normalize, device, min(batch_size or config.eval_batch_size, 32))}

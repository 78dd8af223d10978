"""The training loop, on Accelerate: one CPU, one GPU, many GPUs or nodes (``accelerate launch``), with mixed
precision, gradient accumulation, periodic evaluation, TensorBoard logs and exact resume.

Order of one optimisation step (readable top to bottom in :func:`train`): forward under ``accumulate``, skip on a
non-finite loss, backward, clip, step optimizer and lr schedule, then log / checkpoint / evaluate on sync steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from iedp.config import Config
from iedp.engine.data import build_dataset, make_loader
from iedp.engine.evaluate import check_depth_crop, evaluate_model
from iedp.engine.latents import with_cached_latents
from iedp.engine.optim import build_optimizer, optimizer_class
from iedp.engine.train_state import CheckpointManager
from iedp.errors import InputError, Interrupted
from iedp.models.build import build_model
from iedp.models.tasks import TASKS
from iedp.outputs import json_text

logger = logging.getLogger(__name__)


class StopRequested:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step, so a kill ends with a checkpoint."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.immediate = False  # set during validation: a signal interrupts it at once (KeyboardInterrupt)
        self._previous = {}

    def __enter__(self) -> StopRequested:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signal = signum
        if self.immediate:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _flat(tree: dict, prefix: str = "") -> dict[str, float | int | str | bool]:
    """Config as flat scalars, the form TensorBoard's hparams accept."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


def sync_batchnorm(
    model: torch.nn.Module, task: str, num_processes: int, device_type: str
) -> torch.nn.Module:
    """SyncBatchNorm in the heads of segmentation models trained on several GPUs (VPD's mmseg config); depth models
    keep plain BatchNorm, each GPU normalising its own share of the batch (VPD's depth model)."""
    if TASKS[task].sync_batchnorm and num_processes > 1 and device_type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@dataclass
class _Run:
    """What :func:`_set_up` builds for the loop: the prepared model, optimizer, data and checkpoints."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: torch.utils.data.DataLoader
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset | None
    checkpoints: CheckpointManager
    steps_per_epoch: int


def train(config: Config, resume: str | None = None) -> Path:
    """Train ``config`` into ``config.train.out``; returns the folder of the final model checkpoint."""
    config = with_absolute_data_paths(config)
    tc = config.train
    run = _set_up(config)
    accelerator, model, checkpoints = run.accelerator, run.model, run.checkpoints
    step = checkpoints.resume(resume) if resume else 0  # restores the RNG states saved with the checkpoint
    _log_start(config, run, step)
    progress = tqdm(
        total=tc.max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process
    )
    bad_steps = 0
    skipped: dict[str, str] = {}  # data.skip_bad: files skipped, gathered from every loader worker
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    with StopRequested() as stop:
        while step < tc.max_steps and stop.signal is None:
            batches = _epoch_batches(run, step)
            tic = time.perf_counter()
            for batch in batches:
                skipped.update(pair for pairs in batch.pop("skipped", ()) for pair in pairs)
                losses, finite = _forward_backward(run, batch, tc.grad_clip)
                if not accelerator.sync_gradients:
                    continue
                run.scheduler.step()
                step += 1
                if finite:
                    _check_finite_weights(trainable, step, accelerator, tc.lr, checkpoints)
                bad_steps = 0 if finite else bad_steps + 1
                progress.update(1)
                if bad_steps:
                    _skip_bad_step(step, bad_steps, tc.max_bad_steps, checkpoints)
                if step % tc.log_every == 0 or step == tc.max_steps:
                    tic = _log_step(run, losses, step, tic, tc.log_every, progress)
                if step % tc.checkpoint_every == 0 or step == tc.max_steps:
                    checkpoints.save(step)
                validate = run.val_set is not None and (step % tc.eval_every == 0 or step == tc.max_steps)
                if validate and not _validate(run, config, step, stop):
                    break  # a signal abandoned validation
                if step >= tc.max_steps or _stop_everywhere(stop, accelerator):
                    break
        if stop.signal is not None and step % tc.checkpoint_every:
            logger.warning("signal %d: saving a checkpoint at step %d and stopping", stop.signal, step)
            checkpoints.save(step)
    progress.close()
    return _finish(run, step, tc.max_steps, stop, skipped)


def with_absolute_data_paths(config: Config) -> Config:
    """``config`` with its data folders (``data.root``, ``data.depth_root``) and the files found from the working
    folder (lists, scene table) made absolute, so that the checkpoints' configs still name them when ``iedp
    evaluate`` runs from another folder. A file relative to ``data.root`` stays as written: it is found there."""
    data, changes = config.data, {}
    for key in ("root", "depth_root"):
        value = getattr(data, key)
        if value and Path(value).expanduser().is_dir():
            changes[key] = str(Path(value).expanduser().resolve())
    for key in ("train_list", "test_list", "scenes"):
        value = getattr(data, key)
        if value and Path(value).expanduser().is_file():
            changes[key] = str(Path(value).expanduser().resolve())
    return dataclasses.replace(config, data=dataclasses.replace(data, **changes)) if changes else config


def _set_up(config: Config) -> _Run:
    """Accelerator, model (frozen parts in the mixed-precision dtype), optimizer, data, checkpoints, all prepared."""
    tc = config.train
    optimizer_class(tc.optimizer)  # a missing optional library stops the run before the model loads
    if config.data.cache_latents and (config.data.augment or config.data.dataset != "synthetic"):
        raise InputError(
            "data.cache_latents: needs data.dataset=synthetic and data.augment=false (only un-augmented "
            "images have fixed latents)"
        )
    out = Path(tc.out)
    accelerator = Accelerator(
        gradient_accumulation_steps=tc.grad_accum,
        mixed_precision=tc.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=tc.seed),
        # one lr-schedule step per optimisation step, whatever the number of processes
        step_scheduler_with_optimizer=False,
    )
    with accelerator.main_process_first():  # the data first: its problems are found before the weights load
        train_set = build_dataset(config, "train")
        val_set = build_dataset(config, "val") if tc.eval_every > 0 else None
    if val_set is not None:
        check_depth_crop(config, val_set)
    set_seed(tc.seed)  # identical initial weights on every rank
    model = build_model(config.model)
    model = sync_batchnorm(model, config.model.task, accelerator.num_processes, accelerator.device.type)
    if tc.mixed_precision != "no":
        for part in model.frozen_modules():
            # not part.to(dtype): diffusers' override warns about float32 modules even when it has none
            part.bfloat16() if tc.mixed_precision == "bf16" else part.half()
    optimizer, scheduler = build_optimizer(model, model.unet, tc, task=config.model.task)
    if config.data.cache_latents:
        with accelerator.main_process_first():
            root = Path(config.model.cache_dir) if config.model.cache_dir else None
            train_set = with_cached_latents(model.backbone, train_set, root)
    loader = make_loader(train_set, tc.batch_size, config.data.num_workers, shuffle=True, seed=tc.seed)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    checkpoints = CheckpointManager(out / "checkpoints", accelerator, config, tc.checkpoints_total_limit)
    set_seed(tc.seed + accelerator.process_index)  # per-rank dropout streams
    steps_per_epoch = len(loader) // tc.grad_accum
    if steps_per_epoch == 0:
        raise InputError(
            f"data: {len(train_set)} training samples give no full step of "
            f"{tc.batch_size}×{accelerator.num_processes} processes×{tc.grad_accum} accumulation"
        )
    return _Run(
        accelerator, model, optimizer, scheduler, loader, train_set, val_set, checkpoints, steps_per_epoch
    )


def _log_start(config: Config, run: _Run, step: int) -> None:
    """The banner (examples, batch per device and in total, steps) and the run's config as TensorBoard hparams."""
    tc, accelerator = config.train, run.accelerator
    total_batch = tc.batch_size * accelerator.num_processes * tc.grad_accum
    logger.info(
        "training %s/%s: %d examples, %d per device, total batch %d (%d processes × %d accumulation), "
        "%d optimisation steps (%.1f epochs), starting at step %d",
        config.model.task,
        config.model.method,
        len(run.train_set),
        tc.batch_size,
        total_batch,
        accelerator.num_processes,
        tc.grad_accum,
        tc.max_steps,
        tc.max_steps / run.steps_per_epoch,
        step,
    )
    if accelerator.is_main_process:
        accelerator.init_trackers("iedp", config=_flat(config.to_dict()))


def _epoch_batches(run: _Run, step: int):
    """The batches of the epoch ``step`` falls in, from where ``step`` left it (a resume mid-epoch)."""
    grad_accum = run.accelerator.gradient_accumulation_steps
    epoch, done_in_epoch = divmod(step, run.steps_per_epoch)
    run.loader.set_epoch(epoch)
    run.train_set.set_epoch(epoch)
    if done_in_epoch:
        return run.accelerator.skip_first_batches(run.loader, done_in_epoch * grad_accum)
    return run.loader


def _forward_backward(run: _Run, batch: dict, grad_clip: float) -> tuple[dict[str, torch.Tensor], bool]:
    """One accumulated forward / backward / clip / optimizer step; the losses, and whether the loss was finite on
    every rank (if not, every rank skips the update together)."""
    accelerator, model, optimizer = run.accelerator, run.model, run.optimizer
    with accelerator.accumulate(model):
        losses = model(batch)
        non_finite = accelerator.reduce((~torch.isfinite(losses["loss"])).float().detach(), "max")
        finite = non_finite.item() == 0.0
        if finite:
            accelerator.backward(losses["loss"])
            if accelerator.sync_gradients and grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, finite


def _skip_bad_step(step: int, bad_steps: int, max_bad_steps: int, checkpoints: CheckpointManager) -> None:
    """Warn about a skipped step; after ``max_bad_steps`` in a row, save a checkpoint and stop."""
    logger.warning("step %d: non-finite loss, step skipped (%d in a row)", step, bad_steps)
    if bad_steps >= max_bad_steps:
        checkpoints.save(step)
        raise FloatingPointError(
            f"step {step}: {bad_steps} non-finite losses in a row; stopped (checkpoint saved). "
            "Lower train.lr or use train.mixed_precision=bf16 instead of fp16"
        )


def _log_step(
    run: _Run, losses: dict[str, torch.Tensor], step: int, tic: float, log_every: int, progress: tqdm
) -> float:
    """Log the losses (averaged over processes), each group's lr and the time per step; returns the new start time."""
    accelerator = run.accelerator
    scalars = {k: accelerator.reduce(v.detach(), "mean").item() for k, v in losses.items()}
    scalars |= {f"lr/{g['name']}": g["lr"] for g in run.optimizer.param_groups}
    scalars["time/step_s"] = (time.perf_counter() - tic) / log_every
    tic = time.perf_counter()
    accelerator.log(scalars, step=step)
    progress.set_postfix(loss=f"{scalars['loss']:.4f}")
    return tic


def _validate(run: _Run, config: Config, step: int, stop: StopRequested) -> bool:
    """Evaluate on the validation set, log the metrics and append them to ``metrics.jsonl`` (the learning curve);
    False when a signal abandoned it. The model is back in train mode either way."""
    accelerator, model = run.accelerator, run.model
    stop.immediate = True  # Ctrl-C stops validation within a sample, not at its end
    try:
        metrics = evaluate_model(accelerator.unwrap_model(model), run.val_set, config, accelerator)
    except KeyboardInterrupt:
        logger.warning("signal during validation at step %d: validation abandoned", step)
        model.train()
        return False
    finally:
        stop.immediate = False
    accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=step)
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}
    logger.info("step %d: %s", step, json.dumps(shown))
    if accelerator.is_main_process:
        out = Path(config.train.out)
        (out / "metrics.json").write_text(json_text({"step": step, **metrics}))
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as history:
            history.write(json_text({"step": step, **metrics}, indent=None, default=str) + "\n")
    model.train()
    return True


def _finish(run: _Run, step: int, max_steps: int, stop: StopRequested, skipped: dict[str, str]) -> Path:
    """Save the final model (when training ran to the end), list skipped files, and raise if a signal stopped it."""
    accelerator, checkpoints = run.accelerator, run.checkpoints
    accelerator.wait_for_everyone()
    final = checkpoints.save_final(accelerator.unwrap_model(run.model)) if step >= max_steps else None
    accelerator.end_training()
    skipped.update(getattr(run.train_set, "skipped", {}))  # samples read in this process (num_workers=0)
    if skipped:
        names = sorted(skipped)
        logger.warning(
            "skipped %d unreadable training files: %s%s",
            len(names),
            ", ".join(names[:20]),
            f", ... ({len(names) - 20} more)" if len(names) > 20 else "",
        )
    if stop.signal is not None:
        name = signal.Signals(stop.signal).name
        raise Interrupted(
            stop.signal,
            f"stopped by {name} at step {step}; checkpoint {checkpoints.latest()} saved "
            f"(continue with: iedp train ... --resume)",
        )
    return final or checkpoints.latest()


def _check_finite_weights(
    params: list[torch.Tensor], step: int, accelerator: Accelerator, lr: float, checkpoints: CheckpointManager
) -> None:
    """Stop at the first update that leaves a non-finite weight: every later loss would be NaN, and a checkpoint
    of such weights predicts one class everywhere. Nothing is saved; the previous checkpoint stays the newest."""
    norms = torch._foreach_norm([p.detach() for p in params], float("inf"))  # max |w|: no overflow, NaN stays
    bad = accelerator.reduce((~torch.isfinite(torch.stack(norms))).any().float(), "max")
    if bad.item():
        raise FloatingPointError(
            f"step {step}: the weight update made weights NaN or infinite (train.lr={lr:g}); stopped without "
            f"saving them (newest checkpoint: {checkpoints.latest() or 'none'}). Lower train.lr or set "
            "train.grad_clip"
        )


def _stop_everywhere(stop: StopRequested, accelerator: Accelerator) -> bool:
    """True on every rank once any rank was signalled, so all of them stop at the same step."""
    flag = torch.tensor(float(stop.signal is not None), device=accelerator.device)
    return accelerator.reduce(flag, "max").item() > 0

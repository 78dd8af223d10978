"""The miniature pre-training, start to finish, and its cache behind ``resolve_weights("tiny-pretrained")``.

``pretrain_tiny`` starts from :func:`iedp.weights.make_tiny` (same classes, sizes and tokenizer) and trains,
in order: (a) the VAE, (b) CLIP, (c) the UNet as a text-to-image model on (a)'s latents and (b)'s text tower.
Each part is saved in its standard format as soon as it is trained, and read back through the project's
loaders (``load_clip``) before the next stage uses it, so the folder works as ``model.weights`` like any
SD + CLIP folder: ``unet/``, ``vae/`` (diffusers), ``clip/`` (transformers, with the tokenizer), plus
``scheduler/`` (the training noise schedule), the report (``report.md``, ``report.json``, ``samples.png``) and
``version.json`` (the cache key, see :func:`cache_key`).

A run that stops (a crash, Ctrl-C) loses at most the stage it was in: each finished stage is recorded in the
folder's ``stages.json`` with its report, and the same command on the same folder and settings resumes after it
(the scenes are rendered again and the VAE's latents re-encoded; every stage seeds its own random numbers, so the
weights are those of an uninterrupted run). The file is removed once the run completes. The same mechanism finishes
a build whose UNet stage was trained apart on a finished world's VAE and CLIP (:func:`stage_unet_build`), as
``bench/stage_probe.py unet --save`` does.

The world built with :data:`DEFAULT_CONFIG` ships inside the package (``iedp/resources/tiny_world``), so
``resolve_weights("tiny-pretrained")`` needs no pre-training; it is used only while its ``version.json`` key
matches :func:`cache_key` of the current code, and otherwise rebuilt into the cache (with a warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPModel, CLIPTokenizer

from iedp.cache import build_cached, cache_root
from iedp.data.prompts import scene_prompt
from iedp.data.synthetic import RENDERER_VERSION, SYNTHETIC_SCENES, render_scene
from iedp.errors import InputError
from iedp.pretrain.classifier import classify, scene_classifier, train_classifier
from iedp.pretrain.clip import ClipScorer, evaluate_clip, train_clip
from iedp.pretrain.config import DEFAULT_CONFIG, DEFAULT_PRETRAIN_TIME, PretrainConfig
from iedp.pretrain.data import SceneSet, render_scenes
from iedp.pretrain.report import reconstruction_grid, sample_grid, to_uint8, write_report
from iedp.pretrain.text_to_image import Conditioner, denoising_losses, generate, noise_scheduler, train_unet
from iedp.pretrain.vae import encode_latents, evaluate_vae, latent_scaling_factor, train_vae
from iedp.weights.loaders import load_clip, load_stable_diffusion
from iedp.weights.tiny import TINY_VERSION, make_tiny
from iedp.workers import intra_op_threads, one_thread_per_worker, start_worker, usable_cores

logger = logging.getLogger(__name__)

PRETRAIN_VERSION = "2"
"""Bump whenever the same config trains different weights (part of the cache key)."""

# The tiny models' operations are too small to gain from intra-op threads, and threads that wait for each other
# stall whenever another job holds a core: on a shared 2-core machine one thread ran each stage 3x faster than
# two. Restored afterwards.
_NUM_THREADS = 1


STAGES_FILE = "stages.json"
"""The finished stages of an unfinished run in its folder: ``{"key": ..., "stages": {name: {"report", "seconds"}}}``."""

TRAINED_PARTS = ("vae", "clip", "unet")
"""The stages that train a part of the world, each named after the folder it saves."""


SHIPPED_DIR = Path(__file__).resolve().parent.parent / "resources" / "tiny_world"
"""The world pre-trained with :data:`DEFAULT_CONFIG`, shipped with the package."""


def render_fingerprint() -> str:
    """16 hex digits of a hash of a few small renders (pixels, labels, depth): changes whenever the renderer
    draws differently, even if nobody bumped ``RENDERER_VERSION``."""
    digest = hashlib.sha256()
    for seed in range(4):
        sample = render_scene(seed, 24, 32)
        for array in (sample.rgb, sample.label, np.round(sample.depth, 3)):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def cache_key(config: PretrainConfig) -> str:
    """12 hex digits of a hash of the tiny preset's, the renderer's and this code's versions, a fingerprint of
    the renderer's output and ``config``."""
    payload = {
        "tiny": TINY_VERSION,
        "renderer": RENDERER_VERSION,
        "pretrain": PRETRAIN_VERSION,
        "render_fingerprint": render_fingerprint(),
        "config": asdict(config),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def check_build_folder(out: Path, config: PretrainConfig) -> bool:
    """Whether ``out`` already holds the finished build of ``config``. False when a build may go there: a new or
    empty folder, or a build in progress (its :data:`STAGES_FILE`). Anything else, which a build would overwrite,
    is an :class:`InputError`."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file, not a folder")
    if not out.exists() or not any(out.iterdir()) or (out / STAGES_FILE).is_file():
        return False
    key = stored_key(out)
    if key == cache_key(config):
        return True
    found = f"a finished build of other settings (key {key})" if key else "not a build of the tiny world"
    raise InputError(f"{out}: {found}, which this build would overwrite; choose a new or empty folder")


def stored_key(folder: Path) -> str | None:
    """The cache key in ``folder/version.json``, or None when there is none."""
    path = folder / "version.json"
    return json.loads(path.read_text(encoding="utf-8"))["key"] if path.is_file() else None


def pretrained_tiny_dir(config: PretrainConfig | None = None) -> Path:
    """The pre-trained tiny weights: the shipped world (:data:`SHIPPED_DIR`) when ``config`` is
    :data:`DEFAULT_CONFIG` and the shipped key matches, else ``cache_root()/tiny-pretrained-<key>``, built by
    :func:`pretrain_tiny` on first use (``config`` defaults to :data:`DEFAULT_CONFIG`)."""
    config = config or DEFAULT_CONFIG
    key = cache_key(config)
    if config == DEFAULT_CONFIG:
        shipped = stored_key(SHIPPED_DIR)
        if shipped == key:
            return SHIPPED_DIR
        logger.warning(
            "the shipped tiny world (%s) has key %s, not %s of the current preset, renderer and pre-training "
            "code: pre-training it again into the cache (%s; if stopped, the next use resumes it; `iedp "
            "pretrain-tiny DIR --device cuda` takes minutes on a GPU, then use it with model.weights=DIR)",
            SHIPPED_DIR,
            shipped,
            key,
            DEFAULT_PRETRAIN_TIME,
        )
    target = cache_root() / f"tiny-pretrained-{key}"
    return build_cached(
        target, lambda folder: pretrain_tiny(folder, config), "the pre-trained tiny weights", resumable=True
    )


def pretrain_tiny(
    out_dir: str | Path,
    config: PretrainConfig | None = None,
    workers: int | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Pre-train the tiny VAE, CLIP and text-to-image UNet on synthetic scenes into ``out_dir``; returns it.

    ``config`` defaults to :data:`DEFAULT_CONFIG`. Writes ``unet/``, ``vae/``, ``clip/``, ``scheduler/``,
    ``report.json``, ``report.md``, ``reconstructions.png`` and ``samples.png``.

    On a GPU (``device``), the stages train there one after another in this process, and the scenes are rendered
    in ``workers`` processes (default: every usable core). The random draws (batches, crops, noise, captions) are
    made on the CPU whatever the device, so a GPU run sees the same batches as a CPU run; its weights differ only
    by the devices' arithmetic.

    The stages that do not depend on each other run side by side when ``workers`` is 2 (the default on a machine
    with two or more cores): the VAE and then the scene classifier in a spawned worker process, CLIP and then the
    UNet (which needs both the VAE and CLIP) in this one. Every process runs one intra-op thread (see
    :mod:`iedp.workers`) and every stage seeds its own random numbers, so the weights do not depend on
    ``workers``; the caller's thread count is restored afterwards.
    """
    config = config or DEFAULT_CONFIG
    device = torch.device(device)
    if workers is not None and (workers < 1 or (device.type == "cpu" and workers > 2)):
        raise InputError(f"--workers: must be 1 or 2 on the CPU and at least 1 on a GPU, got {workers}")
    if device.type != "cpu":
        return _pretrain(Path(out_dir), config, None, device, workers or usable_cores())
    workers = min(2, usable_cores()) if workers is None else workers
    with intra_op_threads(_NUM_THREADS):
        if workers < 2:
            return _pretrain(Path(out_dir), config, None, device, 1)
        level = logging.getLogger().getEffectiveLevel()
        context = multiprocessing.get_context("spawn")
        with (
            one_thread_per_worker(),
            ProcessPoolExecutor(1, mp_context=context, initializer=start_worker, initargs=(level,)) as pool,
        ):
            return _pretrain(Path(out_dir), config, pool, device, workers)


def _start(pool: ProcessPoolExecutor | None, job: Callable[..., Any], *args: Any) -> Future:
    """``job(*args)`` in ``pool``'s worker, or here and now when there is no pool."""
    if pool is not None:
        return pool.submit(job, *args)
    future: Future = Future()
    future.set_result(job(*args))
    return future


def _pretrain(
    out: Path,
    config: PretrainConfig,
    pool: ProcessPoolExecutor | None,
    device: torch.device,
    render_workers: int,
) -> Path:
    """The stages of :func:`pretrain_tiny` and the report; ``pool`` (if any) runs the VAE and classifier, which
    is only on the CPU."""
    start = time.perf_counter()
    key = cache_key(config)
    stages = StageRecord.load(out, key)
    out.mkdir(parents=True, exist_ok=True)
    stages.write()
    run = {
        "workers": 1 if pool is None else 2,
        "render_workers": render_workers,
        "device": _device_name(device),
        "resumed_after": sorted(stages.finished),
    }
    initialise_unfinished(out, config.seed, stages.finished)
    train = render_scenes("train", config.num_train, config.resolution, config.data_seed, render_workers)
    heldout = render_scenes("val", config.num_heldout, config.resolution, config.data_seed)
    train, heldout = train.to(device), heldout.to(device)
    timings = {"render": time.perf_counter() - start}
    logger.info("render done in %.0f s (%d processes)", timings["render"], render_workers)

    vae_job = _start(pool, _vae_job, train, heldout, config, out, stages.finished.get("vae"))
    if "vae" not in stages.finished:
        # recorded as soon as the worker is done, even if CLIP fails here meanwhile (the pool waits for the job)
        vae_job.add_done_callback(stages.add_when_done("vae"))
    scorer, clip_report = _clip_part(train, heldout, config, out, stages, timings)
    vae_report, latents, timings["vae"] = vae_job.result()
    # the classifier reads the trained VAE; it trains in the worker while the UNet trains here
    classifier_job = _start(pool, _classifier_job, train, heldout, config, out)

    unet, vae = (
        part.to(device) for part in load_stable_diffusion(str(out))
    )  # the trained VAE, as a user reads it
    conditioner = Conditioner(scorer.text, scorer.tokenizer)
    unet_losses = _unet_part(
        unet, latents, vae.config.scaling_factor, train, conditioner, config, out, stages, timings
    )
    classifier, classifier_report, timings["classifier"] = classifier_job.result()

    unet_report = _timed(
        timings,
        "evaluation",
        _evaluate_unet,
        unet,
        vae,
        scorer,
        classifier,
        conditioner,
        heldout,
        config,
        out,
    )
    timings["total"] = time.perf_counter() - start
    reports = {
        "vae": vae_report,
        "clip": clip_report,
        "unet": {**unet_report, "losses": unet_losses},
        "classifier": classifier_report,
    }
    _write_outputs(out, key, config, run, timings, reports)
    stages.clear()
    logger.info(
        "pre-trained tiny weights in %s (%.0f s); report: %s", out, timings["total"], out / "report.md"
    )
    return out


def _write_outputs(
    out: Path,
    key: str,
    config: PretrainConfig,
    run: dict[str, Any],
    timings: dict[str, float],
    reports: dict[str, dict[str, Any]],
) -> None:
    """``version.json`` and the report: ``run``'s facts, the timings, each stage's figures and its losses."""
    version = {
        "key": key,
        "versions": {"tiny": TINY_VERSION, "renderer": RENDERER_VERSION, "pretrain": PRETRAIN_VERSION},
        "render_fingerprint": render_fingerprint(),
    }
    (out / "version.json").write_text(json.dumps(version, indent=1) + "\n", encoding="utf-8")
    report = {
        **version,
        "config": asdict(config),
        **run,
        "timings_s": timings,
        **{stage: {k: v for k, v in figures.items() if k != "losses"} for stage, figures in reports.items()},
        "losses": {stage: figures["losses"] for stage, figures in reports.items()},
    }
    write_report(out, report)


@dataclass
class StageRecord:
    """The finished stages of a run in ``folder``, each with its report and wall time, kept in
    :data:`STAGES_FILE` as each one finishes, so that the same run on the same folder resumes after them."""

    folder: Path
    key: str
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)
    # a worker's stage is recorded from the pool's thread while this process's stages record from the main one
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(cls, folder: Path, key: str) -> StageRecord:
        """The stages an interrupted run with the same cache ``key`` finished in ``folder``; none when there is no
        record, or when the record is of a run with other settings (then the run starts over)."""
        path = folder / STAGES_FILE
        if not path.is_file():
            return cls(folder, key)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            finished = dict(record["stages"])
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(
                f"{path}: unreadable record of finished stages ({error}); delete it to start over"
            ) from None
        if record.get("key") != key:
            logger.warning(
                "%s: a run with other settings (key %s, not %s); starting over", path, record.get("key"), key
            )
            return cls(folder, key)
        logger.info("resuming in %s: %s already trained", folder, ", ".join(sorted(finished)))
        return cls(folder, key, finished)

    def add(self, stage: str, report: Any, seconds: float) -> None:
        """Record ``stage`` as finished (once its part is saved), rewriting the file atomically."""
        with self.lock:
            self.finished[stage] = {"report": report, "seconds": seconds}
            self.write()

    def write(self) -> None:
        """The record as it stands, written atomically: from the start of a run, so that its folder is known as a
        build in progress even before a stage has finished."""
        path = self.folder / STAGES_FILE
        staging = path.with_suffix(".tmp")
        record = {"key": self.key, "stages": self.finished}
        staging.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        os.replace(staging, path)

    def add_when_done(self, stage: str) -> Callable[[Future], None]:
        """A done-callback for the future of a job that returns ``(report, ..., seconds)``: records ``stage`` if
        the job succeeded."""

        def record(job: Future) -> None:
            if not job.cancelled() and job.exception() is None:
                result = job.result()
                self.add(stage, result[0], result[-1])

        return record

    def replay(self, stage: str, timings: dict[str, float]) -> Any:
        """The report of the finished ``stage``; its wall time goes into ``timings``."""
        timings[stage] = self.finished[stage]["seconds"]
        return self.finished[stage]["report"]

    def clear(self) -> None:
        """The run is complete: remove the record."""
        (self.folder / STAGES_FILE).unlink(missing_ok=True)


def _clip_part(
    train: SceneSet,
    heldout: SceneSet,
    config: PretrainConfig,
    out: Path,
    stages: StageRecord,
    timings: dict[str, float],
) -> tuple[ClipScorer, dict[str, Any]]:
    """The CLIP stage (:func:`_clip_stage`), or the CLIP an interrupted run saved: a scorer on it and the report."""
    if "clip" in stages.finished:
        return _scorer(out / "clip", train.images.device), stages.replay("clip", timings)
    scorer, report = _timed(timings, "clip", _clip_stage, train, heldout, config, out)
    stages.add("clip", report, timings["clip"])
    return scorer, report


def _unet_part(
    unet: UNet2DConditionModel,
    latents: tuple[torch.Tensor, torch.Tensor],
    scaling_factor: float,
    train: SceneSet,
    conditioner: Conditioner,
    config: PretrainConfig,
    out: Path,
    stages: StageRecord,
    timings: dict[str, float],
) -> list[float]:
    """Train ``unet`` as a text-to-image model and save it with the noise schedule; returns its losses. After an
    interruption that came after this stage, ``unet`` is the one it saved and only its losses are returned."""
    if "unet" in stages.finished:
        return stages.replay("unet", timings)
    losses = _timed(timings, "unet", train_unet, unet, latents, scaling_factor, train, conditioner, config)
    _save_unet(unet, out)
    stages.add("unet", losses, timings["unet"])
    return losses


UNET_STAGE_SETTINGS = ("unet_steps", "unet_batch", "unet_lr", "snr_gamma", "caption_dropout")
"""The settings that only the UNet stage reads: builds that differ in these alone have the same VAE and CLIP."""


def stage_unet_build(
    out: Path,
    world: Path,
    config: PretrainConfig,
    unet: UNet2DConditionModel,
    losses: list[float],
    seconds: float,
) -> None:
    """Make ``out`` an interrupted build of ``config`` that has finished its VAE and CLIP stages with ``world``'s
    parts and its UNet stage with ``unet``, trained elsewhere as :func:`train_unet` trains on them (``losses`` and
    ``seconds`` its record). :func:`pretrain_tiny` on ``out`` with ``config`` then trains the scene classifier and
    writes the report, as after any interruption. ``world`` and ``out`` as :func:`check_unet_build` asks."""
    report = check_unet_build(out, world, config)
    for part in ("vae", "clip"):
        shutil.copytree(world / part, out / part)
    shutil.copy2(world / "reconstructions.png", out / "reconstructions.png")
    _save_unet(unet, out)
    stages = StageRecord(out, cache_key(config))
    for part in ("vae", "clip"):
        stages.add(part, {**report[part], "losses": report["losses"][part]}, report["timings_s"][part])
    stages.add("unet", losses, seconds)


def check_unet_build(out: Path, world: Path, config: PretrainConfig) -> dict[str, Any]:
    """``world``'s report, if :func:`stage_unet_build` can use it for ``config`` into ``out``: ``world`` is a
    finished build by the current code whose settings differ from ``config`` in :data:`UNET_STAGE_SETTINGS` only
    (so its VAE and CLIP are the ones ``config`` trains), and ``out`` is new or empty."""
    report_path = world / "report.json"
    if not report_path.is_file():
        raise InputError(f"{world}: not a finished build of the tiny world (no report.json)")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    built = PretrainConfig(**report["config"])
    if report["key"] != cache_key(built):
        raise InputError(f"{world}: built by other code (key {report['key']}, not {cache_key(built)})")
    other = [
        f.name
        for f in fields(PretrainConfig)
        if f.name not in UNET_STAGE_SETTINGS and getattr(built, f.name) != getattr(config, f.name)
    ]
    if other:
        raise InputError(
            f"{world}: built with other {', '.join(other)}; its VAE and CLIP are not these settings'"
        )
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: not empty; choose a new folder")
    return report


def initialise_unfinished(out: Path, seed: int, finished: dict[str, dict[str, Any]]) -> None:
    """The preset's initial weights (:func:`make_tiny`) in ``out`` for every part whose stage has not finished:
    all of them on a fresh run; after an interruption, a part saved half-way is replaced too."""
    if not finished:
        make_tiny(out, seed=seed)
        return
    with tempfile.TemporaryDirectory() as scratch:
        make_tiny(scratch, seed=seed)
        for part in TRAINED_PARTS:
            if part not in finished:
                shutil.rmtree(out / part, ignore_errors=True)
                shutil.copytree(Path(scratch) / part, out / part)


def save_part(part: AutoencoderKL | UNet2DConditionModel, folder: Path) -> None:
    """``part`` in diffusers' format in ``folder``, its config naming the world rather than the (temporary) folder
    it was read from, which diffusers would record as ``_name_or_path``."""
    part.register_to_config(_name_or_path="tiny-pretrained")
    part.save_pretrained(folder, safe_serialization=True)


def _save_unet(unet: UNet2DConditionModel, out: Path) -> None:
    """The trained UNet and the noise schedule it was trained with, in their diffusers folders of ``out``."""
    save_part(unet, out / "unet")
    noise_scheduler().save_pretrained(out / "scheduler")


def _timed(timings: dict[str, float], stage: str, job: Callable[..., Any], *args: Any) -> Any:
    """``job(*args)``, its wall time recorded as ``timings[stage]`` and logged."""
    tic = time.perf_counter()
    result = job(*args)
    timings[stage] = time.perf_counter() - tic
    logger.info("%s done in %.0f s", stage, timings[stage])
    return result


def _vae_job(
    train: SceneSet, heldout: SceneSet, config: PretrainConfig, out: Path, finished: dict[str, Any] | None
) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor], float]:
    """The VAE stage on the preset's VAE in ``out``: its report, the training latents and its wall time; with
    ``finished`` (the stage's record from an interrupted run), only the latents of the VAE it saved. Runs in the
    worker process when there is one."""
    tic = time.perf_counter()
    _, vae = load_stable_diffusion(str(out))
    vae = vae.to(train.images.device)
    if finished is not None:
        return finished["report"], encode_latents(vae, train, config.unet_resolution), finished["seconds"]
    report, latents = _vae_stage(vae, train, heldout, config, out)
    return report, latents, time.perf_counter() - tic


def _classifier_job(
    train: SceneSet, heldout: SceneSet, config: PretrainConfig, out: Path
) -> tuple[torch.nn.Module, dict[str, Any], float]:
    """The scene-classifier stage with the trained VAE in ``out``: the classifier, its report and its wall time.
    Runs in the worker process when there is one."""
    tic = time.perf_counter()
    _, vae = load_stable_diffusion(str(out))
    classifier, report = _classifier_stage(vae.to(train.images.device), train, heldout, config)
    return classifier, report, time.perf_counter() - tic


def _vae_stage(
    vae: AutoencoderKL, train: SceneSet, heldout: SceneSet, config: PretrainConfig, out: Path
) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor]]:
    """Train and save the VAE (with its latent scaling factor); returns its report and the training latents."""
    random_init = evaluate_vae(vae, heldout)
    losses = train_vae(vae, train, config)
    trained = evaluate_vae(vae, heldout)
    with torch.no_grad():
        inputs = heldout.float_images(slice(0, 8))
        reconstructions = vae.decode(vae.encode(inputs).latent_dist.mean).sample.clamp(-1, 1)
    reconstruction_grid(inputs, reconstructions).save(out / "reconstructions.png")
    latents = encode_latents(vae, train, config.unet_resolution)
    vae.register_to_config(scaling_factor=latent_scaling_factor(latents[0]))
    save_part(vae, out / "vae")
    logger.info(
        "vae: held-out PSNR %.2f dB, chroma ratio %.2f (random init %.2f dB, mean colour %.2f, thumbnail %.2f)",
        trained["psnr_vae"],
        trained["chroma_ratio"],
        random_init["psnr_vae"],
        trained["psnr_mean_colour"],
        trained["psnr_thumbnail"],
    )
    report = {
        "random_init": random_init,
        "trained": trained,
        "scaling_factor": vae.config.scaling_factor,
        "losses": losses,
    }
    return report, latents


def _clip_stage(
    train: SceneSet, heldout: SceneSet, config: PretrainConfig, out: Path
) -> tuple[ClipScorer, dict[str, Any]]:
    """Train and save CLIP; returns a scorer on the saved towers (read back by ``load_clip``) and the report."""
    clip_dir, device = out / "clip", train.images.device
    random_init = evaluate_clip(
        _scorer(clip_dir, device), heldout, config.retrieval_gallery, config.object_template
    )
    clip = CLIPModel.from_pretrained(clip_dir).to(device)
    losses = train_clip(clip, CLIPTokenizer.from_pretrained(clip_dir), train, config)
    clip.save_pretrained(clip_dir, safe_serialization=True)
    scorer = _scorer(clip_dir, device)
    trained = evaluate_clip(scorer, heldout, config.retrieval_gallery, config.object_template)
    logger.info(
        "clip: held-out zero-shot scene accuracy %.3f (random init %.3f, chance %.3f), recall@1 i2t %.3f t2i %.3f, "
        "object precision@5 %.3f (chance %.3f)",
        trained["zero_shot_accuracy"],
        random_init["zero_shot_accuracy"],
        1 / len(SYNTHETIC_SCENES),
        trained["i2t_r1"],
        trained["t2i_r1"],
        trained["object_p5"],
        trained["object_p5_chance"],
    )
    report = {
        "random_init": random_init,
        "trained": trained,
        "num_scene_types": len(SYNTHETIC_SCENES),
        "losses": losses,
    }
    return scorer, report


def _scorer(clip_dir: Path, device: torch.device) -> ClipScorer:
    """A :class:`ClipScorer` on the CLIP saved in ``clip_dir``, read by ``load_clip``, on ``device``."""
    vision, text, tokenizer = load_clip(str(clip_dir))
    return ClipScorer(vision.to(device), text.to(device), tokenizer)


def _device_name(device: torch.device) -> str:
    """The accelerator's name ("NVIDIA H200") or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _scene_indices(scenes: SceneSet) -> torch.Tensor:
    return torch.tensor([SYNTHETIC_SCENES.index(scene) for scene in scenes.scenes])


def _classifier_stage(
    vae: AutoencoderKL, train: SceneSet, heldout: SceneSet, config: PretrainConfig
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the independent scene classifier on the real training renders; report its held-out accuracy on
    real renders and on their VAE reconstructions at ``unet_resolution`` (what the samples are)."""
    size = config.classifier_resolution
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        classifier = scene_classifier().to(train.images.device)
    losses = train_classifier(
        classifier, train.float_images(slice(None), size), _scene_indices(train), config
    )
    truth = _scene_indices(heldout)
    real = (classify(classifier, heldout.float_images(slice(None), size)) == truth).float().mean().item()
    with torch.no_grad():
        latents, _ = encode_latents(vae, heldout, config.unet_resolution)
        decoded = torch.cat([vae.decode(latents[i : i + 32]).sample for i in range(0, len(latents), 32)])
    decoded = F.interpolate(decoded.clamp(-1, 1), size=(size, size), mode="area")
    through_vae = (classify(classifier, decoded) == truth).float().mean().item()
    logger.info("classifier: held-out accuracy %.3f on renders, %.3f through the VAE", real, through_vae)
    return classifier, {"heldout_accuracy": real, "heldout_vae_accuracy": through_vae, "losses": losses}


@torch.no_grad()
def _evaluate_unet(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    scorer: ClipScorer,
    classifier: torch.nn.Module,
    conditioner: Conditioner,
    heldout: SceneSet,
    config: PretrainConfig,
    out: Path,
) -> dict[str, Any]:
    """The UNet's figures (denoising MSE by context; the scene type of its samples, by the independent classifier
    and by CLIP) and samples.png.

    CLIP's verdict is read against the same CLIP on real held-out scenes passed through the VAE, since the
    samples are decoded by it too.
    """
    size, scaling_factor = config.unet_resolution, vae.config.scaling_factor
    heldout_latents, _ = encode_latents(vae, heldout, size)
    denoising, bands = denoising_losses(
        unet, heldout_latents, scaling_factor, heldout, conditioner, config.denoise_draws, config.seed
    )
    prompts = [scene_prompt(scene) for scene in SYNTHETIC_SCENES for _ in range(config.samples_per_scene)]
    samples = generate(
        unet,
        vae,
        scaling_factor,
        conditioner,
        prompts,
        size,
        config.sample_steps,
        config.guidance_scale,
        config.seed,
    )
    intended = torch.arange(len(SYNTHETIC_SCENES)).repeat_interleave(config.samples_per_scene)
    small = F.interpolate(samples, size=(config.classifier_resolution,) * 2, mode="area")
    classifier_accuracy = (classify(classifier, small) == intended).float().mean().item()
    sample_accuracy = (scorer.zero_shot_scenes(samples) == intended).float().mean().item()
    reconstructions = vae.decode(heldout_latents).sample.clamp(-1, 1)
    reconstruction_accuracy = (
        (scorer.zero_shot_scenes(reconstructions) == _scene_indices(heldout)).float().mean().item()
    )
    sample_grid(_grid_rows(samples, heldout, config)).save(out / "samples.png")
    logger.info(
        "unet: MSE own caption %.4f vs another scene's %.4f; the classifier finds the prompted scene in %.3f of "
        "the samples, CLIP in %.3f (%.3f of VAE-decoded real scenes)",
        denoising["caption"],
        denoising["wrong_scene"],
        classifier_accuracy,
        sample_accuracy,
        reconstruction_accuracy,
    )
    return {
        "denoising_mse": denoising,
        "denoising_by_timestep": bands,
        "samples_per_scene": config.samples_per_scene,
        "sample_classifier_accuracy": classifier_accuracy,
        "sample_zero_shot_accuracy": sample_accuracy,
        "reconstruction_zero_shot_accuracy": reconstruction_accuracy,
    }


def refresh_denoising(folder: str | Path) -> Path:
    """Recompute the held-out denoising figures (:func:`denoising_losses`) of the world in ``folder`` with the
    current code and the settings its report records, and rewrite its report; the weights and every other figure
    stay. These figures need no training, so a report written by older code can gain them in seconds."""
    folder = Path(folder)
    path = folder / "report.json"
    if not path.is_file():
        raise InputError(f"{path}: no report to refresh (not a folder written by iedp pretrain-tiny)")
    report = json.loads(path.read_text(encoding="utf-8"))
    config = PretrainConfig(**report["config"])
    heldout = render_scenes("val", config.num_heldout, config.resolution, config.data_seed)
    unet, vae = load_stable_diffusion(str(folder))
    scorer = _scorer(folder / "clip", heldout.images.device)
    with intra_op_threads(_NUM_THREADS):  # as pre-training ran: the same rounding, the same figures
        latents, _ = encode_latents(vae, heldout, config.unet_resolution)
        report["unet"]["denoising_mse"], report["unet"]["denoising_by_timestep"] = denoising_losses(
            unet,
            latents,
            vae.config.scaling_factor,
            heldout,
            Conditioner(scorer.text, scorer.tokenizer),
            config.denoise_draws,
            config.seed,
        )
    write_report(folder, report)
    logger.info("refreshed the denoising figures of %s", path)
    return folder


def _grid_rows(
    samples: torch.Tensor, heldout: SceneSet, config: PretrainConfig
) -> list[tuple[str, np.ndarray, list[np.ndarray]]]:
    """(scene, its first held-out image, or white if none, and its generated images) for each scene type."""
    generated = to_uint8(samples)
    size, per_scene = config.unet_resolution, config.samples_per_scene
    rows = []
    for row, scene in enumerate(SYNTHETIC_SCENES):
        index = next((i for i, name in enumerate(heldout.scenes) if name == scene), None)
        real = (
            to_uint8(heldout.float_images(slice(index, index + 1), size))[0]
            if index is not None
            else np.full((size, size, 3), 255, dtype=np.uint8)
        )
        rows.append((scene.replace("_", " "), real, generated[row * per_scene : (row + 1) * per_scene]))
    return rows

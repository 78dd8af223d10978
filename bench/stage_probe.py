"""One stage of the tiny world's pre-training, tried alone before rebuilding the whole world (an hour on 2 cores).

``vae`` trains stage (a), ``unet`` stage (c), as ``iedp pretrain-tiny`` does (the preset's initial weights, the same
training scenes, batches and code) with ``--set`` changes to the default settings, in one process of one thread.
The UNet trains on the latents and text tower of an existing world (``--world``, the shipped one by default),
so what changes is the UNet alone. Each is scored on held-out scenes of another data seed (``--selection-seed``),
never on the report's, so what a probe chooses is not tuned on the figures the report shows: the VAE by
:func:`iedp.pretrain.vae.evaluate_vae` (PSNR, chroma kept), the UNet by
:func:`iedp.pretrain.text_to_image.denoising_losses` (noise-prediction MSE by caption, overall and by timestep
range). ``--score-only`` scores the world's own part instead of training, for the baseline on the same scenes. Run
two probes side by side on a 2-core machine, one per core.

    python -m bench.stage_probe vae --set vae_chroma_weight=4 --json bench/results/vae_probe_chroma4.json
    python -m bench.stage_probe unet --set snr_gamma=none --json bench/results/unet_probe_plain_mse.json
    python -m bench.stage_probe unet --score-only --json bench/results/unet_probe_shipped.json

A UNet probe that looks worth a world is kept with ``--save DIR``, and the rebuild then costs only the scene
classifier and the report (minutes), since its VAE and CLIP are the world's (the same as the settings would train):

    python -m bench.stage_probe unet --set unet_steps=56000 --save /tmp/w56k --json bench/results/unet_probe_56k.json
    iedp pretrain-tiny /tmp/w56k --set unet_steps=56000
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bench.timing import machine
from iedp.config import with_overrides
from iedp.pretrain.config import DEFAULT_CONFIG, PretrainConfig
from iedp.pretrain.data import SceneSet, render_scenes
from iedp.pretrain.pipeline import SHIPPED_DIR, check_unet_build, stage_unet_build
from iedp.pretrain.text_to_image import Conditioner, denoising_losses, own_caption_margin, train_unet
from iedp.pretrain.vae import encode_latents, evaluate_vae, train_vae
from iedp.weights.loaders import load_clip, load_stable_diffusion
from iedp.weights.tiny import make_tiny
from iedp.workers import intra_op_threads

STAGES = ("vae", "unet")


def probe(
    stage: str,
    overrides: list[str],
    selection_seed: int,
    num_selection: int,
    world: str,
    score_only: bool,
    save: Path | None = None,
) -> dict[str, Any]:
    """Train ``stage`` from the preset's initial weights (or, with ``score_only``, take ``world``'s) and score
    it on ``num_selection`` scenes of ``selection_seed``'s validation split. With ``save`` (``unet`` only), the
    trained UNet and ``world``'s VAE and CLIP become a build of these settings there that ``iedp pretrain-tiny``
    finishes (:func:`~iedp.pretrain.pipeline.stage_unet_build`)."""
    config = with_overrides(DEFAULT_CONFIG, overrides)
    selection = render_scenes("val", num_selection, config.resolution, selection_seed)
    record = {
        "stage": stage,
        "set": overrides,
        "config": asdict(config),
        "world": world,
        "score_only": score_only,
        "selection_seed": selection_seed,
        "machine": machine(torch.device("cpu")),
    }
    if save is not None:
        check_unet_build(save, Path(world), config)  # before hours of training, not after
    world_unet, world_vae = load_stable_diffusion(world)
    if score_only:
        return {**record, **_score(stage, world_unet, world_vae, world, selection, config)}
    train = render_scenes("train", config.num_train, config.resolution, config.data_seed)
    with tempfile.TemporaryDirectory() as folder:
        make_tiny(folder, seed=config.seed)
        unet, vae = load_stable_diffusion(folder)
    start = time.perf_counter()
    with intra_op_threads(1):  # the pre-training's own setting: the same rounding, so the same weights
        if stage == "vae":
            losses = train_vae(vae, train, config)
        else:
            vae = world_vae
            latents = encode_latents(vae, train, config.unet_resolution)
            losses = train_unet(unet, latents, vae.config.scaling_factor, train, _conditioner(world), config)
    seconds = time.perf_counter() - start
    if save is not None:
        stage_unet_build(save, Path(world), config, unet, losses, seconds)
    return {
        **record,
        "train_seconds": seconds,
        "last_loss": sum(losses[-100:]) / len(losses[-100:]),
        **_score(stage, unet, vae, world, selection, config),
    }


def _conditioner(world: str) -> Conditioner:
    _, text, tokenizer = load_clip(str(Path(world) / "clip"))
    return Conditioner(text, tokenizer)


def _score(
    stage: str, unet: Any, vae: Any, world: str, selection: SceneSet, config: PretrainConfig
) -> dict[str, Any]:
    """The VAE's reconstruction figures, or the UNet's denoising MSE by caption (and the margin of its own
    caption over another scene type's, overall and by timestep range)."""
    if stage == "vae":
        return evaluate_vae(vae, selection)
    latents, _ = encode_latents(vae, selection, config.unet_resolution)
    overall, bands = denoising_losses(
        unet,
        latents,
        vae.config.scaling_factor,
        selection,
        _conditioner(world),
        config.denoise_draws,
        config.seed,
    )
    return {
        "denoising_mse": overall,
        "denoising_by_timestep": bands,
        "own_caption_margin": own_caption_margin(overall),
        "margin_by_timestep": [own_caption_margin(band) for band in bands],
    }


def _summary(result: dict[str, Any]) -> str:
    if result["stage"] == "vae":
        return f"PSNR {result['psnr_vae']:.2f} dB, chroma kept {result['chroma_ratio']:.3f}"
    bands = ", ".join(f"{100 * m:.1f}" for m in result["margin_by_timestep"])
    return f"own caption {100 * result['own_caption_margin']:.2f} % lower (by timestep range: {bands} %)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a PretrainConfig change"
    )
    parser.add_argument(
        "--selection-seed",
        type=int,
        default=2,
        help="data seed of the scoring scenes (not the training data_seed, 1 by default)",
    )
    parser.add_argument("--num-selection", type=int, default=240)
    parser.add_argument(
        "--world",
        default=str(SHIPPED_DIR),
        help="the world whose part is scored, or whose VAE and CLIP the UNet uses",
    )
    parser.add_argument("--score-only", action="store_true", help="score the world's own part; train nothing")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument(
        "--save",
        type=Path,
        default=None,
        metavar="DIR",
        help="unet: also make DIR a build of these settings with the world's VAE and CLIP and this UNet, which "
        "`iedp pretrain-tiny DIR --set ...` (the same changes) finishes",
    )
    args = parser.parse_args()
    if args.save is not None and (args.score_only or args.stage != "unet"):
        parser.error("--save: only a trained UNet is saved (stage unet, without --score-only)")
    if args.selection_seed == with_overrides(DEFAULT_CONFIG, args.set).data_seed:
        parser.error(
            f"--selection-seed: {args.selection_seed} is the training scenes' data seed; choose another"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)  # scoring too, as every probe so far was scored
    result = probe(
        args.stage, args.set, args.selection_seed, args.num_selection, args.world, args.score_only, args.save
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"{_summary(result)} -> {args.json}")


if __name__ == "__main__":
    main()

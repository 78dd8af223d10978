"""One setting of the tiny VAE's pre-training, tried alone before rebuilding the whole world (an hour on 2 cores).

Trains stage (a) as ``iedp pretrain-tiny`` does (the preset's initial weights, the same training scenes, batches
and code: :func:`iedp.pretrain.vae.train_vae`) with ``--set`` changes to the default settings, in one process of
one thread, and scores it (:func:`iedp.pretrain.vae.evaluate_vae`: PSNR and the chroma kept) on held-out scenes
of another data seed (``--selection-seed``), never on the report's, so what a probe chooses is not tuned on the
figures the report shows. ``--vae DIR`` scores the VAE in ``DIR/vae`` instead (e.g. the shipped world's), for
the baseline on the same scenes. Run two probes side by side on a 2-core machine, one per core.

    python -m bench.vae_probe --set vae_chroma_weight=4 --json bench/results/vae_probe_chroma4.json
    python -m bench.vae_probe --vae iedp/resources/tiny_world --json bench/results/vae_probe_shipped.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.timing import machine
from iedp.config import with_overrides
from iedp.pretrain.data import render_scenes
from iedp.pretrain.pipeline import DEFAULT_CONFIG
from iedp.pretrain.vae import evaluate_vae, train_vae
from iedp.weights.loaders import load_stable_diffusion
from iedp.weights.tiny import make_tiny


def probe(overrides: list[str], selection_seed: int, num_selection: int, vae_dir: str | None) -> dict:
    """Train (or read) the VAE and score it on ``num_selection`` scenes of ``selection_seed``'s validation split."""
    config = with_overrides(DEFAULT_CONFIG, overrides)
    selection = render_scenes("val", num_selection, config.resolution, selection_seed)
    record = {
        "set": overrides,
        "config": asdict(config),
        "selection_seed": selection_seed,
        "machine": machine(torch.device("cpu")),
    }
    if vae_dir is not None:
        _, vae = load_stable_diffusion(vae_dir)
        return {**record, "vae": vae_dir, **evaluate_vae(vae, selection)}
    train = render_scenes("train", config.num_train, config.resolution, config.data_seed)
    with tempfile.TemporaryDirectory() as folder:
        make_tiny(folder, seed=config.seed)
        _, vae = load_stable_diffusion(folder)
    start = time.perf_counter()
    losses = train_vae(vae, train, config)
    seconds = time.perf_counter() - start
    return {
        **record,
        "train_seconds": seconds,
        "last_loss": sum(losses[-100:]) / len(losses[-100:]),
        **evaluate_vae(vae, selection),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    parser.add_argument("--vae", metavar="DIR", help="score DIR/vae instead of training")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    if args.selection_seed == with_overrides(DEFAULT_CONFIG, args.set).data_seed:
        parser.error(
            f"--selection-seed: {args.selection_seed} is the training scenes' data seed; choose another"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)  # the pre-training's own setting: the same rounding, the same weights
    result = probe(args.set, args.selection_seed, args.num_selection, args.vae)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"PSNR {result['psnr_vae']:.2f} dB, chroma kept {result['chroma_ratio']:.3f} -> {args.json}")


if __name__ == "__main__":
    main()

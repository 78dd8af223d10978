"""Whole segmentation inference (real-size model, batch 16, bf16, 512×512) with the eager and the compiled VAE
encoder (``model.compile_vae``), measured side by side on one GPU.

    python bench/compile_probe.py OUT_DIR      # writes OUT_DIR/compile.json (median of 7 after 2 warm-ups)
"""

import json
import sys
from pathlib import Path

import torch

# Run as a file, only bench/ is on the import path; ``bench.*`` needs the repository root (see speed.py).
if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench.speed_models import build_seg_model, make_batch, prepare, real_size_parts
from bench.timing import stage_call, time_calls


def main(out: Path) -> None:
    device = torch.device("cuda")
    model = build_seg_model(real_size_parts(device, 0), 0, False, 256)
    prepare(model, "bf16", False)
    batch = make_batch(16, 512, model.num_classes, device, 0)
    medians = {}
    for variant in ("eager", "compiled_vae"):
        if variant == "compiled_vae":
            model.backbone.compile_encoder()
        for stage in ("vae", "inference"):
            times, _ = time_calls(stage_call(model, stage, batch, "bf16", False), device, 2, 7)
            medians[f"{stage}_{variant}"] = sorted(times)[len(times) // 2]
            print(variant, stage, medians[f"{stage}_{variant}"], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile.json").write_text(json.dumps(medians, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

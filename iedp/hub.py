"""Hugging Face Hub folders: a checkpoint plus ``metrics.json`` and a generated ``README.md`` model card.

The card's front matter (licence, tags, pipeline tag, base model) is written with ``huggingface_hub``'s
:class:`~huggingface_hub.ModelCardData`, so the Hub indexes it; the text says what the model is, how it was
trained, what it scored in its last evaluation and how to use it.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from iedp.config import Config
from iedp.methods import METHODS
from iedp.models.iedp import IEDPModel
from iedp.models.tasks import TASKS

METRICS_NAME = "metrics.json"
CARD_NAME = "README.md"

SD_V15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY_WEIGHTS = ("tiny", "tiny-pretrained")


def read_metrics(folder: Path) -> dict | None:
    """The last evaluation's metrics: ``folder/metrics.json`` as ``iedp evaluate`` writes it
    (``{"metrics": {...}}``), else the training run's ``metrics.json`` next to ``final/`` (``{"step": N, ...}``)."""
    for path in (folder / METRICS_NAME, folder.parent / METRICS_NAME):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue
        if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
            return data["metrics"]
        if isinstance(data, dict) and "step" in data:
            return {k: v for k, v in data.items() if k != "step"}
    return None


def base_licence(config: Config) -> tuple[str, str]:
    """(licence id for the card's front matter, sentence): the tiny preset is this project's own (Apache-2.0);
    anything built on Stable Diffusion v1.5 inherits its CreativeML OpenRAIL-M licence."""
    if config.model.weights in TINY_WEIGHTS and not config.model.sd:
        return "apache-2.0", "Built on iedp's tiny preset (generated locally, Apache-2.0): a test model."
    return (
        "creativeml-openrail-m",
        "The diffusion UNet and VAE are fine-tuned from / copied from Stable Diffusion v1.5, so this model "
        "is under the [CreativeML OpenRAIL-M](https://huggingface.co/spaces/CompVis/stable-diffusion-license) "
        "licence, use restrictions included; the frozen CLIP ViT-L/14 image tower is MIT-licensed (OpenAI).",
    )


def metrics_table(metrics: dict | None, task: str) -> str:
    if not metrics:
        return "No evaluation recorded yet: run `iedp evaluate` on this folder and save it again."
    keys = [k for k in TASKS[task].summary_metrics if k in metrics]
    rows = "\n".join(f"| {k} | {metrics[k]:.4f} |" for k in keys)
    unit = " (%)" if task == "seg" else " (rmse in metres)"
    return f"| metric | value{unit} |\n|---|---|\n{rows}"


def model_card(model: IEDPModel, config: Config, metrics: dict | None) -> ModelCard:
    """The card of a checkpoint: task, method, training config, metrics of its last evaluation, licence, usage."""
    task, pipeline_tag = TASKS[model.task].card
    licence, licence_text = base_licence(config)
    tiny = licence == "apache-2.0"
    data = ModelCardData(
        license=licence,
        library_name="iedp",
        pipeline_tag=pipeline_tag,
        tags=["iedp", f"method-{model.method}", "diffusion-perception"]
        + ([] if tiny else ["stable-diffusion"]),
        base_model=None if tiny else SD_V15,
        datasets=[config.data.dataset],
    )
    m, d, t = config.model, config.data, config.train
    usage = (
        '```python\nimport iedp\n\nmodel = iedp.load("<this folder or hub id>")\n'
        'result = model("photo.jpg")\n'
        + (
            "result.labels        # (H, W) class indices\nresult.overlay       # PIL image\nresult.areas()\n"
            if model.task == "seg"
            else "result.depth         # (H, W) metres\nresult.color         # PIL image\n"
        )
        + "```\n\nOr on the command line: `iedp predict <folder> photo.jpg --out out/`; "
        '`iedp serve <folder>` opens a web app (`pip install "iedp[app]"`).'
    )
    classes = ", ".join(model.class_names[:12]) + (", ..." if model.num_classes > 12 else "")
    text = f"""---
{data.to_yaml()}
---

# {model.method} · {task} · {config.data.dataset}

An [iedp](https://arxiv.org/abs/2404.07600) checkpoint for **{task}**.

- **Method:** `{model.method}`: {METHODS[model.method].description}.
- **Classes** ({model.num_classes}{" scenes" if model.task == "depth" else ""}): {classes}
- **Base weights:** `{m.weights}`{f" (SD: `{m.sd}`)" if m.sd else ""}{f" (CLIP: `{m.clip}`)" if m.clip else ""}

## Training

| key | value |
|---|---|
| data | `{d.dataset}`, {f"{d.resolution}×{d.resolution} scenes" if d.dataset == "synthetic" else f"crop {d.crop_size}"} |
| steps | {t.max_steps}, batch {t.batch_size} × accumulation {t.grad_accum} |
| optimiser | AdamW, lr {t.lr}, weight decay {t.weight_decay}, schedule `{t.schedule}` |
| precision | `{t.mixed_precision}` |
| seed | {t.seed} |

The full resolved config is `config.json` (`"config"`); `iedp evaluate <folder>` reruns the evaluation.

## Evaluation (last run)

{metrics_table(metrics, model.task)}

## Usage

{usage}

## Licence

{licence_text}
"""
    return ModelCard(text)


def write_model_card(folder: Path, model: IEDPModel, config: Config, metrics: dict | None) -> Path:
    path = Path(folder) / CARD_NAME
    model_card(model, config, metrics).save(path)
    return path

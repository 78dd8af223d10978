"""Records to comparisons, goals and BENCHMARKS.md rows for bench/speed.py. :func:`append_rows` (gpu_check.py's
too) adds rows to the BENCHMARKS.md of the repository root, whatever the working directory."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.speed_models import CONFIGURATIONS

ROOT = Path(__file__).resolve().parent.parent  # the repository root, where BENCHMARKS.md lives
BENCHMARKS = ROOT / "BENCHMARKS.md"
SECTION = "Speed: our attention vs VPD-style attention (bench/speed.py)"
HEADER = (
    "| date | machine | device | dtype | stage | variant | input | batch | grad ckpt | channels_last "
    "| median s (n) | CPU s | img/s | extra peak MiB | speedup (baseline/ours time) | ours/baseline extra peak "
    "| load avg |"
)

SPEED_DESCRIPTION = (
    "Real-size SD v1.5 UNet/VAE + CLIP ViT-L/14 with random weights (same seed for both variants), ADE20K "
    "segmentation model (150 classes, `iedp`). *ours*: SDPA everywhere + `ClassAttentionProcessor` capture; "
    "*baseline*: diffusers' classic `AttnProcessor` on every UNet/VAE attention layer + VPD-style capture from "
    "`get_attention_scores`. The two variants share one process and one set of weights and alternate call by "
    "call (so load from other processes hits both alike); *extra peak* is the peak of a variant's first call "
    "in a fresh process above the post-build level (CPU: RSS high-water mark; GPU: `max_memory_allocated`). "
    "*CPU s*: median process CPU time of a call (all threads); *load avg*: the 1-minute load average after the "
    "timing (above the core count, other processes shared the CPU). Produced by `python bench/speed.py`."
)


DEFAULTS_SECTION = "Our defaults vs VPD's configuration (bench/speed.py --parts defaults)"
DEFAULTS_DESCRIPTION = (
    "Issue 15: the same real-size model and weights as above (fp32 weights, as `iedp predict` loads them), "
    "three configurations alternating call by call in one process. *ours-default*: what `iedp predict`/"
    "`evaluate` run by default on the device (our attention, autocast to `resolve_dtype(None, device)`, the "
    "backbone's default VAE input format); *vpd-config*: VPD's configuration (fp32, diffusers' classic "
    "`AttnProcessor` everywhere, VPD-style capture, contiguous, no compile); *ours-default-contiguous*: "
    "ours-default with a contiguous VAE input. The speedup column is vpd-config's time over the row's. "
    "Produced by `python bench/speed.py --parts defaults`."
)


BENCHMARKS_INTRO = """# Benchmarks

Rows below are appended by the scripts in `bench/`: each run adds one dated row per measured configuration to
its section's table (machine, settings, median time of the timed repetitions after warm-up, peak memory), so
older rows stay for comparison. The text under each table is written by hand after a run.
"""


COMPARED_KEYS = ("stage", "dtype", "size", "batch_size", "gradient_checkpointing", "channels_last")
# Configurations differ in dtype and memory format on purpose: they are paired on the rest.
CONFIGURATION_KEYS = ("stage", "size", "batch_size", "gradient_checkpointing")
PAIRS = (
    # (variant, the reference it is compared with, the keys both records must share)
    ("ours", "baseline", COMPARED_KEYS),
    ("ours-default", "vpd-config", CONFIGURATION_KEYS),
    ("ours-default-contiguous", "vpd-config", CONFIGURATION_KEYS),
)


# -- records and comparisons ---------------------------------------------------------------------------------
def find(records: list[dict], **match: object) -> dict | None:
    for record in records:
        if "error" not in record and all(record.get(k) == v for k, v in match.items()):
            return record
    return None


def merge_memory(records: list[dict]) -> list[dict]:
    """Move the peak memory of each memory-only record into the timed record of the same configuration."""
    merged = [r for r in records if not r.get("memory_only") or "error" in r]
    for extra in records:
        if not extra.get("memory_only") or "error" in extra:
            continue
        target = find(merged, variant=extra["variant"], **{k: extra[k] for k in COMPARED_KEYS})
        if target is not None:
            target["memory"] = {**extra["memory"], "from": "a separate fresh worker (one call)"}
    return merged


def comparisons(records: list[dict]) -> list[dict]:
    """reference/variant time and variant/reference extra-peak ratios for each pair of :data:`PAIRS` measured
    in the same configuration (ours vs baseline; our defaults, with and without channels_last, vs VPD's)."""
    result = []
    for variant, reference, keys in PAIRS:
        result += [
            compare(ours, baseline, reference)
            for ours in records
            if "error" not in ours and ours["variant"] == variant
            if (baseline := find(records, variant=reference, **{k: ours[k] for k in keys})) is not None
        ]
    return result


def compare(ours: dict, baseline: dict, reference: str) -> dict:
    """The ratios of one pair: ``baseline`` (the ``reference`` variant) vs ``ours``."""
    memories = (ours["memory"], baseline["memory"])
    return {
        **{k: ours[k] for k in COMPARED_KEYS},
        "variant": ours["variant"],
        "reference": reference,
        "device": ours["device"],
        "threads": ours.get("threads"),
        "speedup": baseline["median_s"] / ours["median_s"],
        # The variants alternate call by call, so pairs share the load of the moment.
        "speedup_paired_median": statistics.median(
            b / o for o, b in zip(ours["times_s"], baseline["times_s"], strict=True)
        ),
        "cpu_time_speedup": (
            baseline["median_cpu_s"] / ours["median_cpu_s"] if "median_cpu_s" in ours else None
        ),
        "memory_ratio": (
            memories[0]["extra_bytes"] / max(1, memories[1]["extra_bytes"]) if all(memories) else None
        ),
    }


def goals(compared: list[dict]) -> dict:
    """The issues' goals at the measured sizes (reported, never asserted): the CPU fp32 attention goals (ours vs
    baseline) and issue 15's defaults goals (ours-default vs vpd-config, whole inference: ≥ 3× on CPU, ≥ 4× with
    ≤ ½ the peak memory on GPU).

    Speed ratios are of median wall times, except in single-threaded runs, where the ratio of median CPU times
    is used: it hardly moves when other processes share the machine, while wall time does.
    """
    by_stage = {
        c["stage"]: c
        for c in compared
        if c.get("variant", "ours") == "ours" and c["dtype"] == "fp32" and c["device"] == "cpu"
    }
    by_stage |= {
        f"{c['device']}-defaults-{c['stage']}": c for c in compared if c.get("variant") == "ours-default"
    }
    targets = {
        "unet_speedup>=1.5": ("unet", "speedup", 1.5),
        "unet_memory_ratio<=0.5": ("unet", "memory_ratio", 0.5),
        "inference_speedup>=1.3": ("inference", "speedup", 1.3),
        "train_speedup>=1.5": ("train", "speedup", 1.5),
        "cpu_defaults_inference_speedup>=3": ("cpu-defaults-inference", "speedup", 3.0),
        "cuda_defaults_inference_speedup>=4": ("cuda-defaults-inference", "speedup", 4.0),
        "cuda_defaults_inference_memory_ratio<=0.5": ("cuda-defaults-inference", "memory_ratio", 0.5),
    }
    report = {}
    for name, (stage, key, bound) in targets.items():
        compared_stage = by_stage.get(stage, {})
        if key == "speedup" and compared_stage.get("threads") == 1:
            key = "cpu_time_speedup"
        value = compared_stage.get(key)
        if value is not None:
            met = value >= bound if "speedup" in key else value <= bound
            report[name] = {"measure": key, "value": value, "met": met, "size": compared_stage["size"]}
    return report


# -- rows ----------------------------------------------------------------------------------------------------
def machine_label(info: dict) -> str:
    if info["gpu"]:
        return info["gpu"]
    threads = info["torch_threads"]
    return f"{info['cpu']}, {info['cores']} cores, {threads} thread{'s' if threads > 1 else ''}"


def table_row(record: dict, compared: list[dict], today: str) -> str:
    """One markdown row; the ratio columns are filled on the row of a pair's variant (``ours``,
    ``ours-default``, ``ours-default-contiguous``), against its reference (``baseline``, ``vpd-config``)."""
    size = f"{record['size']}²" + (" tiny" if record.get("tiny") else "")
    settings = [record["dtype"], record["stage"], record["variant"], size]
    if "error" in record:
        cells = [
            today,
            "",
            "",
            *settings,
            "",
            "",
            "yes" if record["channels_last"] else "no",
            record["error"],
        ]
        return "| " + " | ".join(cells + [""] * 6) + " |"
    speedup = memory_ratio = ""
    for c in compared:
        if record["variant"] == c.get("variant", "ours") and all(c[k] == record[k] for k in COMPARED_KEYS):
            speedup = f"{c['speedup']:.2f}×"
            if c.get("cpu_time_speedup"):
                speedup += f" (CPU time {c['cpu_time_speedup']:.2f}×)"
            if c.get("reference", "baseline") != "baseline":
                speedup += f" vs {c['reference']}"
            memory_ratio = "" if c["memory_ratio"] is None else f"{c['memory_ratio']:.2f}"
    memory = record["memory"]
    cells = [
        today,
        machine_label(record["machine"]),
        record["device"],
        *settings,
        str(record["batch_size"]),
        "yes" if record["gradient_checkpointing"] else "no",
        "yes" if record["channels_last"] else "VAE input" if record.get("vae_channels_last") else "no",
        f"{record['median_s']:.3f} ({len(record['times_s'])})",
        f"{record['median_cpu_s']:.1f}" if "median_cpu_s" in record else "",
        f"{record['images_per_s']:.2f}",
        "" if memory is None else f"{memory['extra_bytes'] / 2**20:.0f}",
        speedup,
        memory_ratio,
        f"{record['load_average']:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def append_rows(path: Path, section: str, header: str, rows: list[str], description: str = "") -> None:
    """Append ``rows`` to the table of ``## section`` in ``path`` (creating the file, section or table)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else BENCHMARKS_INTRO
    lines = text.rstrip("\n").split("\n")
    title = f"## {section}"
    separator = "|" + "---|" * (header.count("|") - 1)
    if title not in lines:
        lines += ["", title, ""] + ([description, ""] if description else []) + [header, separator]
        lines += rows
    else:
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        table = [i for i in range(start, end) if lines[i].startswith("|")]
        if table:
            last = table[0]
            while last + 1 < end and lines[last + 1].startswith("|"):
                last += 1
            lines[last + 1 : last + 1] = rows
        else:
            lines[start + 1 : start + 1] = ["", header, separator, *rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def summarize(today: str, args: dict, records: list[dict], diffs: dict) -> dict:
    """A run's JSON: its records plus the comparisons and goals derived from them."""
    compared = comparisons(records)
    return {
        "date": today,
        "args": args,
        "records": records,
        "comparisons": compared,
        "output_max_abs_diff": diffs,
        "goals": goals(compared),
    }


def report(summary: dict, append: bool) -> None:
    """Print the rows and comparisons of a run; append the rows to BENCHMARKS.md when ``append``."""
    rows = [table_row(r, summary["comparisons"], summary["date"]) for r in summary["records"]]
    print("\n".join([HEADER, "|" + "---|" * (HEADER.count("|") - 1), *rows]))
    keys = ("comparisons", "output_max_abs_diff", "goals")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    if append:
        configurations = [r.get("variant") in CONFIGURATIONS for r in summary["records"]]
        for section, description, wanted in (
            (SECTION, SPEED_DESCRIPTION, False),
            (DEFAULTS_SECTION, DEFAULTS_DESCRIPTION, True),
        ):
            selected = [row for row, c in zip(rows, configurations, strict=True) if c == wanted]
            if selected:
                append_rows(BENCHMARKS, section, HEADER, selected, description)

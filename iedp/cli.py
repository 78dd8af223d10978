"""The ``iedp`` command line: IEDP and VPD for segmentation and depth, from a CPU demo to multi-GPU training.

Bad input (a missing file, a wrong config key, a corrupt image...) ends with one line on stderr and exit status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from iedp.errors import InputError, Interrupted
from iedp.logs import quiet_libraries

logger = logging.getLogger("iedp")

MAX_MESSAGE = 500
"""Longest error line printed; the rest is cut (the whole message is in ``--debug``'s traceback)."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` as one line. An error raised in a DataLoader worker arrives wrapped in the worker's
    traceback ("Caught InputError in DataLoader worker process 0. Original Traceback ..."): its last line, the
    original message naming the file, is kept."""
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name = type(error).__name__
        text = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _make_tiny(args: argparse.Namespace) -> int:
    from iedp.outputs import check_output_dir
    from iedp.weights import make_tiny

    target = Path(args.dir)
    if target.is_dir() and any(target.iterdir()) and not args.force:
        raise InputError(
            f"{target}: folder is not empty; make-tiny would overwrite its weights (use --force, or a new folder)"
        )
    check_output_dir(target, "make-tiny")
    print(make_tiny(target, seed=args.seed))
    return 0


def _pretrain_tiny(args: argparse.Namespace) -> int:
    from iedp.config import with_overrides
    from iedp.engine.inference import resolve_device
    from iedp.pretrain import DEFAULT_CONFIG, QUICK_CONFIG, pretrain_tiny, refresh_denoising
    from iedp.pretrain.pipeline import check_build_folder

    if args.refresh_denoising:
        if args.quick or args.set:
            raise InputError(
                "--refresh-denoising: takes its settings from DIR's report; drop --quick and --set"
            )
        print(refresh_denoising(args.dir))
        return 0
    config = with_overrides(QUICK_CONFIG if args.quick else DEFAULT_CONFIG, args.set)
    if check_build_folder(Path(args.dir), config):
        logging.getLogger(__name__).info(
            "%s: already built with these settings; delete it to build again", args.dir
        )
    else:
        pretrain_tiny(args.dir, config, args.workers, resolve_device(args.device))
    print(args.dir)
    return 0


def _train(args: argparse.Namespace) -> int:
    from iedp.config import load_config
    from iedp.engine.train import train
    from iedp.outputs import check_new_run, check_output_dir

    config = load_config(args.config, args.set)
    if args.resume:
        check_output_dir(config.train.out, "train.out")
    else:
        check_new_run(config.train.out)
    with _missing_extra_as_input_error():  # train.optimizer=adamw8bit without bitsandbytes
        train(config, resume=args.resume)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from iedp.engine.evaluate import evaluate_checkpoint

    evaluate_checkpoint(
        args.checkpoint,
        overrides=args.set,
        multi_scale=args.multi_scale,
        save_predictions=args.save_predictions,
        json_path=args.json,
        device=args.device,
        dtype=args.dtype,
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from iedp.engine.predict import predict_paths

    with _missing_extra_as_input_error():  # video without PyAV
        predict_paths(
            args.checkpoint,
            args.inputs,
            args.out,
            overrides=args.set,
            device=args.device,
            dtype=args.dtype,
            video_batch=args.video_batch,
            raw_frames=args.raw_frames,
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from iedp.app import serve

    with _missing_extra_as_input_error():  # no Gradio
        serve(
            args.checkpoints,
            host=args.host,
            port=args.port,
            share=args.share,
            device=args.device,
            dtype=args.dtype,
            max_pixels=args.max_pixels,
        )
    return 0


@contextmanager
def _missing_extra_as_input_error() -> Iterator[None]:
    """An optional extra that is not installed (bitsandbytes, PyAV, Gradio) ends in one line saying what to
    ``pip install``; an ImportError without that hint is a bug, and keeps its traceback."""
    try:
        yield
    except ImportError as error:
        if "pip install" not in str(error):
            raise
        raise InputError(str(error)) from None


def _convert_vpd(args: argparse.Namespace) -> int:
    from iedp.convert_vpd import convert_vpd

    print(convert_vpd(args.checkpoint, args.task, args.out, args.weights, sd=args.sd, clip=args.clip))
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from iedp.config import load_config
    from iedp.data.check import check_data

    report, problems = check_data(load_config(args.config, args.set), limit=args.limit)
    print(report)
    return 1 if problems else 0


def _demo(args: argparse.Namespace) -> int:
    from iedp.demo import run_demo

    run_demo(args.out, steps=args.steps, weights=args.weights)
    return 0


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``, resolved the same way by every inference command."""
    parser.add_argument("--device", default=None, help="auto (default: the GPU if there is one), cpu, cuda:N")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="inference precision (autocast); auto: bf16 where the GPU or CPU runs it natively, else fp32",
    )


def add_set_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """``--set KEY=VALUE``, repeatable: config overrides; ``example`` one that the command uses."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, one ``_add_<command>`` per subcommand (in the order ``--help`` lists them)."""
    parser = argparse.ArgumentParser(prog="iedp", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (
        _add_make_tiny,
        _add_pretrain_tiny,
        _add_train,
        _add_evaluate,
        _add_predict,
        _add_serve,
        _add_score,
        _add_convert_vpd,
        _add_data,
        _add_demo,
    ):
        add_command(commands)
    return parser


def _add_make_tiny(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("make-tiny", help="write the tiny SD + CLIP preset into DIR")
    p.add_argument(
        "dir", metavar="DIR", help="the folder to write (diffusers unet/ vae/, transformers clip/)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random initial weights")
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty (overwrites)")
    p.set_defaults(func=_make_tiny)


def _add_pretrain_tiny(commands: argparse._SubParsersAction) -> None:
    from iedp.pretrain.config import DEFAULT_PRETRAIN_TIME

    p = commands.add_parser(
        "pretrain-tiny",
        help=f"pre-train the tiny VAE, CLIP and text-to-image UNet on synthetic scenes into DIR ({DEFAULT_PRETRAIN_TIME};"
        " the package ships the result); a stopped run resumes in the same DIR after its finished stages",
    )
    p.add_argument("dir")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (seconds): for tests only")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default), cuda, cuda:N or auto: a GPU trains every stage in minutes instead of an hour",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="on the CPU, processes of one thread each (1 or 2): 2 runs the VAE and CLIP side by side (default: "
        "2 on two or more cores), the weights are the same either way; on a GPU, the processes that render the "
        "scenes (default: every core)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a pre-training setting, repeatable (a field of iedp.pretrain.PretrainConfig, e.g. vae_steps=20000); "
        "the folder's cache key and report record the settings",
    )
    p.add_argument(
        "--refresh-denoising",
        action="store_true",
        help="train nothing: recompute the held-out denoising figures of the world already in DIR with this code and "
        "rewrite its report (seconds; for a report written by an older version)",
    )
    p.set_defaults(func=_pretrain_tiny)


def _add_train(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "train", help="train a model from a YAML recipe (use `accelerate launch` for many GPUs)"
    )
    p.add_argument("config", help="YAML recipe, e.g. configs/ade20k_iedp.yaml")
    add_set_argument(p, "train.max_steps=100")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="resume from the newest complete checkpoint of train.out (or the named checkpoint folder)",
    )
    p.set_defaults(func=_train)


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("evaluate", help="evaluate a checkpoint on its validation/test split")
    p.add_argument("checkpoint", help="a model checkpoint folder (model.safetensors + config.json)")
    add_set_argument(p, "data.root=/data/ADEChallengeData2016")
    p.add_argument("--multi-scale", action="store_true", help="segmentation: scales 1.0-1.5 and flips")
    p.add_argument(
        "--save-predictions", metavar="DIR", help="write predictions in the format `iedp score` reads"
    )
    p.add_argument("--json", metavar="FILE", help="metrics JSON (default: next to the checkpoint)")
    add_device_arguments(p)
    p.set_defaults(func=_evaluate)


def _add_predict(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("predict", help="run a checkpoint on your own images and videos")
    p.add_argument("checkpoint", help="a model checkpoint folder (model.safetensors + config.json)")
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE_OR_DIR_OR_VIDEO",
        help="images, folders of images, videos (.mp4...)",
    )
    p.add_argument("--out", required=True, help="output folder")
    add_set_argument(p, "eval.batch_size=8")
    p.add_argument("--video-batch", type=int, default=4, metavar="N", help="video: frames per forward pass")
    p.add_argument("--raw-frames", action="store_true", help="video: also one label / depth PNG per frame")
    add_device_arguments(p)
    p.set_defaults(func=_predict)


def _add_serve(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "serve",
        help='a web app over checkpoints: upload an image, see the prediction (pip install "iedp[app]")',
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint folders (or hub ids)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--max-pixels", type=int, default=16_000_000, help="largest upload, width × height")
    add_device_arguments(p)
    p.set_defaults(func=_serve)


def _add_score(commands: argparse._SubParsersAction) -> None:
    from iedp import score
    from iedp.metrics.depth import CROPS

    p = commands.add_parser(
        "score",
        help="score saved predictions against ground truth",
        description=score.__doc__.splitlines()[0],
    )
    p.add_argument("task", choices=("seg", "depth"), help="segmentation label maps or depth maps")
    p.add_argument("--pred", type=Path, required=True, help="folder of predictions")
    p.add_argument(
        "--gt",
        type=Path,
        required=True,
        help="folder of ground truth, same file stems (with --list: the NYUv2 root)",
    )
    p.add_argument(
        "--list",
        type=Path,
        default=None,
        help="depth: an NYUv2 list file ('rgb depth [focal]' lines, as data.test_list) naming the ground truth "
        "under --gt; predictions are matched as `iedp evaluate --save-predictions` names them (bathroom_rgb_00045)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    p.add_argument(
        "--num-classes",
        type=int,
        default=score.ADE20K_CLASSES,
        help=f"seg: number of classes (default: ADE20K's {score.ADE20K_CLASSES})",
    )
    p.add_argument(
        "--reduce-zero-label",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="seg: stored 0 is 'other' (ignored) and v means class v-1, the ADE20K convention (default: on)",
    )
    p.add_argument(
        "--crop", choices=CROPS, default="eigen", help="depth: evaluation crop (eigen needs 480x640 maps)"
    )
    p.add_argument(
        "--all",
        action="store_true",
        help=f"seg: print every class (default: the {score.SHOWN} best and worst)",
    )
    p.set_defaults(func=score.run)


def _add_convert_vpd(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "convert-vpd",
        help="import one of VPD's released checkpoints (ADE20K / NYUv2) as an iedp checkpoint (method vpd)",
        description="Convert VPD's released ADE20K (--task seg) or NYUv2 (--task depth) checkpoint into an iedp "
        "checkpoint folder; then `iedp evaluate OUT --set data.root=...` checks it against VPD's numbers. The file "
        "is read with torch.load(weights_only=True): one that needs code to load is refused. VPD's file holds the "
        "fine-tuned UNet, the VAE encoder, the text adapter, the class / scene embeddings and the neck and head; "
        "every key must map, and unknown or missing keys are listed. The frozen parts it lacks (the VAE decoder, "
        "the UNet's noise-prediction output layer that VPD's depth model deletes, and the CLIP vision tower every "
        "iedp checkpoint carries, unused by method vpd) come from --weights.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="VPD's .pth file")
    p.add_argument("--task", required=True, choices=("seg", "depth"), help="seg: ADE20K; depth: NYUv2")
    p.add_argument("--out", required=True, metavar="DIR", help="the iedp checkpoint folder to write")
    p.add_argument(
        "--weights",
        required=True,
        help="the Stable Diffusion v1.5 (unet/, vae/) + CLIP ViT-L/14 (clip/) folder VPD was trained from, as "
        "model.weights; the converted checkpoint records it",
    )
    p.add_argument("--sd", help="override the SD part: a diffusers folder or a v1.5 .safetensors/.ckpt file")
    p.add_argument("--clip", help="override the CLIP part: a transformers CLIP folder")
    p.set_defaults(func=_convert_vpd)


def _add_data(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("data", help="inspect the data a config would read")
    data_commands = p.add_subparsers(dest="data_command", required=True)
    p = data_commands.add_parser(
        "check",
        help="counts per split, classes, depth range, sizes and every problem, without training (exit 1 on problems)",
    )
    p.add_argument("config", help="YAML recipe, e.g. custom_seg_iedp")
    add_set_argument(p, "data.root=/data/my_seg")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="read at most N samples per split")
    p.set_defaults(func=_data_check)


def _add_demo(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("demo", help="the CPU demo: tiny preset + synthetic scenes, iedp vs vpd, report")
    p.add_argument("--out", default="demo_out", help="folder of the runs and report.md (default: demo_out)")
    p.add_argument(
        "--steps", type=int, default=None, help="training steps per run (default: the demo's budget)"
    )
    p.add_argument(
        "--weights", default=None, help="tiny-pretrained (default, shipped with the package) or tiny (random)"
    )
    p.set_defaults(func=_demo)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose and args.command != "score":
        quiet_libraries()
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # log lines above the progress bars, not glued onto them
            return args.func(args)
    except Interrupted as stop:
        print(f"iedp {args.command}: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print(f"iedp {args.command}: interrupted", file=sys.stderr)
        return 130
    # OSError: a file-system problem after the checks (disk full...), or a weights file diffusers cannot load;
    # UnpicklingError: a pickled weights file that holds more than tensors (refused by weights_only loading)
    except (InputError, OSError, pickle.UnpicklingError) as error:
        if args.debug:
            raise
        print(f"iedp {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except FloatingPointError as error:  # training diverged: not bad input, but one line says it all
        if args.debug:
            raise
        print(f"iedp {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

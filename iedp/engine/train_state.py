"""Training state, to resume a run: ``checkpoints/checkpoint-{step}/`` folders written atomically.

Each holds Accelerate's state (optimizer, lr schedule, sampler, RNG and scaler states) plus ``model/``, a
self-contained model checkpoint (:mod:`iedp.model_files`) that ``iedp evaluate`` and ``iedp predict`` accept as it
is. A folder is written under a temporary name and renamed once complete, with ``state.json`` last, so a crash
mid-write leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from iedp.config import Config
from iedp.errors import InputError
from iedp.model_files import WEIGHTS_NAME, check_finite, load_weights, save_model
from iedp.models.iedp import IEDPModel

logger = logging.getLogger(__name__)

PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "state.json"

FIXED_BY_CHECKPOINT = (
    "model.task",
    "model.method",
    "train.optimizer",
    "train.lr",
    "train.unet_lr_mult",
    "train.weight_decay",
    "train.batch_size",
    "train.grad_accum",
    "train.seed",
)
"""Settings a resume cannot change: the optimizer and schedule state restore the learning rates and weight decay,
the sampler and RNG states the batches and seed, the weights the task and method. Other values on the command line
would be logged as applied while the checkpoint's silently win, so :meth:`CheckpointManager.resume` refuses them."""


class CheckpointManager:
    """Saves, prunes and finds training checkpoints under ``root``; every process calls ``save`` together."""

    def __init__(self, root: Path, accelerator: Accelerator, config: Config, total_limit: int | None) -> None:
        self.root = Path(root)
        self.accelerator = accelerator
        self.config = config
        self.total_limit = total_limit
        accelerator.register_save_state_pre_hook(self._save_model_hook)
        accelerator.register_load_state_pre_hook(self._load_model_hook)

    # Accelerate hooks: store the model in our own format instead of one opaque state dict.
    def _save_model_hook(self, models: list, weights: list, output_dir: str) -> None:
        if len(weights) != len(models):  # FSDP / DeepSpeed save the model themselves
            return
        if self.accelerator.is_main_process:
            for model in models:
                save_model(self.accelerator.unwrap_model(model), self.config, Path(output_dir) / "model")
        weights.clear()

    def _load_model_hook(self, models: list, input_dir: str) -> None:
        path = Path(input_dir) / "model" / WEIGHTS_NAME
        if not path.is_file():
            return
        while models:
            model = self.accelerator.unwrap_model(models.pop())
            state = load_file(path)
            check_finite(state, path)
            load_weights(model, state, path)

    def complete(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = PATTERN.match(path.name)
            if match and (path / STATE_NAME).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def save(self, step: int) -> Path | None:
        """Write ``checkpoint-{step}``; on a write error (disk full...) on any rank, log it, keep the previous
        checkpoints and return None so training goes on."""
        accelerator = self.accelerator
        final = self.root / f"checkpoint-{step}"
        tmp = self.root / f".checkpoint-{step}.partial"
        error: OSError | None = None
        accelerator.wait_for_everyone()
        try:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp))
            if accelerator.is_main_process:
                self._write_state(tmp, step)
        except OSError as caught:
            error = caught
        failed = torch.tensor(float(error is not None), device=accelerator.device)
        if accelerator.reduce(failed, "max").item():
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                logger.error(
                    "could not write checkpoint-%d (%s); kept %s",
                    step,
                    error or "on another process",
                    self.latest() or "no earlier checkpoint",
                )
            return None
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
            logger.info("saved %s", final)
        accelerator.wait_for_everyone()
        return final

    def _write_state(self, folder: Path, step: int) -> None:
        """``state.json`` goes last: its presence marks a complete checkpoint."""
        state = folder / STATE_NAME
        state.write_text(json.dumps({"step": step, "config": self.config.to_dict()}, indent=2))
        with open(state, "rb") as f:
            os.fsync(f.fileno())

    def _prune(self) -> None:
        if not self.total_limit:
            return
        for _, path in self.complete()[: -self.total_limit]:
            shutil.rmtree(path, ignore_errors=True)

    def resume(self, spec: str) -> int:
        """Load the checkpoint named by ``spec`` ("latest" or a folder); returns its step."""
        if spec == "latest":
            path = self.latest()
            if path is None:
                logger.warning("--resume: no complete checkpoint in %s, starting from step 0", self.root)
                return 0
        else:
            path = Path(spec)
            if not (path / STATE_NAME).is_file():
                raise InputError(f"--resume {spec}: not a complete training checkpoint (no {STATE_NAME})")
        self._check_unchanged(path)
        self._check_rng_state(path)
        try:
            self.accelerator.load_state(str(path))
        except (
            pickle.UnpicklingError
        ) as error:  # weights_only loading refused an object that is not plain data
            raise InputError(
                f"--resume {path}: refusing to load a file that holds more than tensors ({error})"
            ) from None
        step = json.loads((path / STATE_NAME).read_text())["step"]
        logger.info("resumed from %s at step %d", path, step)
        return step

    def _check_unchanged(self, path: Path) -> None:
        """Refuse a resume that sets any of :data:`FIXED_BY_CHECKPOINT` otherwise than the checkpoint did."""
        saved, current = json.loads((path / STATE_NAME).read_text())["config"], self.config.to_dict()
        changed = []
        for key in FIXED_BY_CHECKPOINT:
            section, name = key.split(".")
            if name in saved.get(section, {}) and saved[section][name] != current[section][name]:
                changed.append(f"{key} is {current[section][name]!r} here but {saved[section][name]!r} there")
        if changed:
            raise InputError(
                f"--resume {path}: {'; '.join(changed)}; a resumed run keeps the checkpoint's, so drop the change "
                "or start a new run (another train.out)"
            )

    def _check_rng_state(self, path: Path) -> None:
        """Accelerate skips an unreadable RNG-state file with an info line, and the resume is silently no longer
        exact: read it first (tensors and plain data only) and refuse it with one line."""
        from accelerate.utils import load as accelerate_load

        rng = path / f"random_states_{self.accelerator.process_index}.pkl"
        if not rng.is_file():
            raise InputError(f"--resume {rng}: missing; without the RNG state the resume would not be exact")
        try:
            states = accelerate_load(rng)
        except Exception as error:  # noqa: BLE001 - any failure: a corrupt or hostile file
            raise InputError(
                f"--resume {rng}: not a valid RNG-state file ({type(error).__name__}); refusing to resume inexactly"
            ) from None
        expected = ("random_state", "numpy_random_seed", "torch_manual_seed")
        if not isinstance(states, dict) or not all(key in states for key in expected):
            raise InputError(f"--resume {rng}: not an RNG-state file (expected {', '.join(expected)})")
        if not isinstance(states["torch_manual_seed"], torch.Tensor):
            raise InputError(f"--resume {rng}: torch_manual_seed is not a tensor")

    def save_final(self, model: IEDPModel) -> Path:
        """The trained model as ``{train.out}/final``, the folder ``evaluate`` and ``predict`` take."""
        final = self.root.parent / "final"
        if self.accelerator.is_main_process:
            save_model(model, self.config, final)
            logger.info("final model: %s", final)
        self.accelerator.wait_for_everyone()
        return final

"""The training output directory: claiming it, checkpoints, and exact resume.

Layout of ``--output``::

    run.json          settings of the run (a directory holding another run is refused)
    metrics.jsonl     one JSON line per logged step and per evaluation
    last/             resume point: model/ (full) or adapter/ (LoRA), optimizer.pt,
                      scheduler.pt, rng.pt, trainer_state.json (step, data position, best)
    best/             lowest eval metric so far: model/ or adapter/, eval.json
    adapter/          final LoRA adapter (LoRA runs)
    model/            final standalone model + tokenizer (LoRA merged in)
    loss_curves.png   loss / eval curves
    summary.json      final metrics
    COMPLETE          written last; its absence means the run did not finish

Checkpoint directories are written under a temporary name and swapped in with renames, so a
crash leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache import __version__
from kdcache.cache.manifest import write_json_atomic
from kdcache.config import changed_keys
from kdcache.errors import KdcacheError
from kdcache.student.data import DataPosition

RUN_FILE = "run.json"
COMPLETE_FILE = "COMPLETE"
METRICS_FILE = "metrics.jsonl"
RUN_KIND = "kdcache-train-student"


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs.

    Attributes:
        step: optimizer steps done.
        position: where the next global batch starts.
        best_value: lowest eval metric so far (None before the first evaluation).
        best_step: step of ``best_value``.
        sequences: sequences trained on so far.
        tokens: supervised tokens trained on so far.
    """

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    best_value: float | None = None
    best_step: int | None = None
    sequences: int = 0
    tokens: int = 0

    def to_json(self) -> dict:
        data = asdict(self)
        data["position"] = self.position.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> TrainerState:
        data = dict(data)
        data["position"] = DataPosition.from_json(data["position"])
        return cls(**data)


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def claim_output(out: Path, settings: dict, *, resume: bool, overwrite: bool) -> bool:
    """Make ``out`` this run's directory. Returns True if a previous run should be resumed.

    * empty or missing: a fresh run;
    * another training run there: refused unless ``overwrite`` (wiped) or ``resume`` with
      the same settings (keys that cannot change the result, e.g. logging, may differ);
      one that never saved a checkpoint holds nothing to resume and is replaced;
    * a finished run with ``resume``: :class:`KdcacheError` saying so;
    * anything else (not a training run): refused, never wiped.
    """
    run_path = out / RUN_FILE
    payload = {"kind": RUN_KIND, "tool_version": __version__, "settings_hash": settings_hash(settings), "settings": settings}
    if out.exists() and not out.is_dir():
        raise KdcacheError(f"{out}: exists and is not a directory; choose another --output")
    existing = None
    if run_path.exists():
        try:
            existing = json.loads(run_path.read_text())
        except ValueError:
            existing = None
        if not isinstance(existing, dict) or existing.get("kind") != RUN_KIND:
            raise KdcacheError(f"{out}: holds something other than a train-student run; choose an empty --output")
    elif out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise KdcacheError(f"{out}: directory is not empty and holds no train-student run; choose an empty --output")

    # A run that stopped before its first checkpoint (e.g. the student failed to load) left
    # nothing to resume: rerunning the command, with any settings, starts it afresh.
    no_progress = not (out / "last" / "trainer_state.json").exists() and not (out / COMPLETE_FILE).exists()
    if existing is not None and (overwrite or no_progress):
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        existing = None
    if existing is not None:
        if not resume:
            if (out / COMPLETE_FILE).exists():
                raise KdcacheError(f"{out}: holds a finished train-student run; use a new --output, or --overwrite to retrain")
            raise KdcacheError(
                f"{out}: holds an unfinished train-student run; pass --resume to continue it or --overwrite to start over"
            )
        if existing.get("settings_hash") != payload["settings_hash"]:
            diffs = changed_keys(existing.get("settings", {}), settings)
            raise KdcacheError(
                f"{out}: --resume with different settings ({', '.join(diffs)} differ); "
                "rerun with the original settings or use --overwrite"
            )
        if (out / COMPLETE_FILE).exists():
            raise KdcacheError(f"{out}: the run already finished (COMPLETE); nothing to resume, use --overwrite to retrain")
        return True
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_path, payload)
    return False


# --------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -------------------------------------------------------------------------- checkpoints


def save_weights(model: torch.nn.Module, directory: Path, tokenizer, lora: bool) -> None:
    """``directory/adapter`` (peft adapter) for LoRA, else ``directory/model`` (HF model dir)."""
    target = directory / ("adapter" if lora else "model")
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` with renames (``final`` stays valid until the last one)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover(final: Path) -> None:
    """After a crash between the two renames of :func:`_swap_in`, put the old copy back."""
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.exists():
        os.replace(old, final)


def save_checkpoint(
    directory: Path,
    *,
    model: torch.nn.Module,
    tokenizer,
    lora: bool,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
) -> None:
    """Write the full resume point (weights, optimizer, scheduler, RNG, trainer state)."""
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tmp, tokenizer, lora)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    write_json_atomic(tmp / "trainer_state.json", state.to_json())
    _swap_in(tmp, directory)


def save_best(directory: Path, *, model: torch.nn.Module, tokenizer, lora: bool, metrics: dict) -> None:
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tmp, tokenizer, lora)
    write_json_atomic(tmp / "eval.json", metrics)
    _swap_in(tmp, directory)


def load_training_state(
    directory: Path, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> TrainerState:
    """Restore optimizer, scheduler and RNG from ``directory``; returns the trainer state.

    The weights are loaded by the caller (they decide how the model is built).
    """
    try:
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=False))
        scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False))
        set_rng_state(torch.load(directory / "rng.pt", weights_only=False))
        return TrainerState.from_json(json.loads((directory / "trainer_state.json").read_text()))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise KdcacheError(f"{directory}: damaged checkpoint ({type(exc).__name__}: {exc}); use --overwrite to restart") from None


def _parse_line(line: str) -> dict | None:
    """One metrics record, or None for a blank or partial line (a run killed mid-append)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    """Append-only JSONL of metrics; on resume, lines after the resumed step are dropped."""

    def __init__(self, path: Path, keep_until_step: int | None = None) -> None:
        self.path = path
        if keep_until_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if (record := _parse_line(line)) is not None and record.get("step", 0) <= keep_until_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif keep_until_step is None:
            path.write_text("")

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def load_json_quiet(path: Path) -> dict:
    """A JSON object from ``path``, or ``{}`` if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

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

A distributed run (:mod:`kdcache.student.distributed`) writes ``last/`` differently:

* full fine-tuning (FSDP2): ``dcp/``, a ``torch.distributed.checkpoint`` of the sharded weights
  and AdamW state (every rank writes its shards; it loads on any number of ranks), plus a
  whole ``model/`` at the final step;
* LoRA (DDP): the adapter and ``optimizer.pt`` as a single process writes them (every rank
  holds the same state);
* both: ``rng-rankNNNNN.pt`` per rank instead of ``rng.pt``, and ``world.json`` (``world_size``,
  ``format``: ``dcp`` or ``files``). A checkpoint without ``world.json`` was written by one process.

Resume rules (:func:`check_resume_layout`): the storage format must match (full fine-tuning
saved by one process resumes in one process, saved under a launcher resumes under a launcher;
LoRA checkpoints are the same either way). The number of ranks may change: the data position
and the weights and optimizer state do not depend on it, but the per-rank random streams do,
so a run that draws random numbers while training (dropout) is refused on another world size.
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
from kdcache.errors import KdcacheError, first_line
from kdcache.student.data import DataPosition

RUN_FILE = "run.json"
COMPLETE_FILE = "COMPLETE"
METRICS_FILE = "metrics.jsonl"
RUN_KIND = "kdcache-train-student"
WORLD_FILE = "world.json"


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs.

    Attributes:
        step: optimizer steps done.
        position: where the next global batch's share of ``--cache`` starts.
        best_value: lowest eval metric so far (None before the first evaluation).
        best_step: step of ``best_value``.
        sequences: sequences trained on so far.
        tokens: supervised tokens trained on so far.
        mix_position: where the next share of ``--mix-cache`` starts (None without one).
    """

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    best_value: float | None = None
    best_step: int | None = None
    sequences: int = 0
    tokens: int = 0
    mix_position: DataPosition | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        data["position"] = self.position.to_json()
        data["mix_position"] = self.mix_position.to_json() if self.mix_position is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> TrainerState:
        data = dict(data)
        data["position"] = DataPosition.from_json(data["position"])
        mix = data.get("mix_position")  # absent in checkpoints of kdcache 0.5.1 and earlier
        data["mix_position"] = DataPosition.from_json(mix) if mix is not None else None
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
    directory: Path, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    restore_rng: bool = True,
) -> TrainerState:
    """Restore optimizer, scheduler and RNG from ``directory``; returns the trainer state.

    The weights are loaded by the caller (they decide how the model is built).
    """
    try:
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=False))
        scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False))
        if restore_rng:
            set_rng_state(torch.load(rng_file(directory, 0), weights_only=False))
        return TrainerState.from_json(json.loads((directory / "trainer_state.json").read_text()))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise KdcacheError(f"{directory}: damaged checkpoint ({type(exc).__name__}: {exc}); use --overwrite to restart") from None


# ------------------------------------------------------------------ distributed runs


def saved_layout(directory: Path) -> dict:
    """``{"world_size": N, "format": "dcp" | "files"}`` of a checkpoint (one process if no world.json)."""
    data = load_json_quiet(directory / WORLD_FILE)
    return {"world_size": int(data.get("world_size", 1)), "format": data.get("format", "files"),
            "distributed": bool(data)}


def rng_file(directory: Path, rank: int) -> Path:
    return directory / (f"rng-rank{rank:05d}.pt" if saved_layout(directory)["distributed"] else "rng.pt")


def check_resume_layout(directory: Path, *, storage: str, world_size: int, random_ops: list[str]) -> bool:
    """Refuse, in one line, a resume that cannot continue exactly; returns whether the saved
    per-rank random states apply (same number of ranks).

    Args:
        storage: how this run stores its state: ``"dcp"`` (full fine-tuning under a launcher) or
            ``"files"`` (one process, or LoRA under a launcher).
        world_size: ranks now (1 for a single process).
        random_ops: what draws random numbers while training (see ``modeling.uses_dropout``).
    """
    check_storage(directory, storage)
    saved = saved_layout(directory)
    if saved["world_size"] == world_size:
        return True
    if random_ops:
        raise KdcacheError(
            f"{directory}: saved by {saved['world_size']} rank(s), resumed on {world_size}: this run draws random "
            f"numbers while training ({', '.join(random_ops)}), whose per-rank streams cannot be carried over; "
            f"resume on {saved['world_size']} rank(s), or use --overwrite to start over")
    return False


def check_storage(directory: Path, storage: str) -> None:
    """Refuse a checkpoint stored another way than this run stores its state (see :func:`check_resume_layout`)."""
    saved = saved_layout(directory)
    if saved["format"] != storage:
        if saved["format"] == "dcp":
            raise KdcacheError(
                f"{directory}: this full fine-tuning run was checkpointed under a launcher by {saved['world_size']} "
                "rank(s) (torch.distributed.checkpoint); resume it under a launcher (torchrun, srun; any number of "
                "ranks), or use --overwrite to start over")
        raise KdcacheError(
            f"{directory}: this full fine-tuning run was checkpointed by one process without a launcher; resume it "
            "the same way (without torchrun/srun), or use --overwrite to start over")


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _full_model_to(step: torch.nn.Module, target: Path, tokenizer, env) -> None:
    """Gather the FSDP2-sharded weights whole on rank 0 (in CPU memory) and save them as a
    transformers model directory ``target`` (rank 0 writes; every rank must call this)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from kdcache.student.distributed import unwrap
    from kdcache.student.modeling import causal_lm

    full = get_model_state_dict(step, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    seen: set[int] = set()
    aliases = set()  # tied weights (one Parameter under two names) are saved once, as save_pretrained does
    for name, param in step.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))

    def write() -> None:
        weights = {k.removeprefix("model."): v for k, v in full.items() if k not in aliases}
        causal_lm(unwrap(step).model).save_pretrained(target, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(target)

    env.on_main(write)


def _write_error(path: Path, exc: BaseException) -> KdcacheError:
    return KdcacheError(f"{path}: cannot write the checkpoint ({first_line(exc)}); free space or fix the path, "
                        "then rerun the same command with --resume")


def save_checkpoint_distributed(
    directory: Path, *, env, step: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainerState, tokenizer, lora: bool, full_model: bool,
) -> None:
    """:func:`save_checkpoint` for a distributed run (every rank calls it; layout in the module docstring).

    ``full_model`` also writes ``model/`` (the final step of full fine-tuning, for the export).
    """
    from kdcache.student.distributed import unwrap

    tmp = directory.with_name(f".{directory.name}.tmp-dist")
    env.on_main(lambda: _fresh_dir(tmp))
    if lora:
        def write_files() -> None:
            save_weights(unwrap(step).model, tmp, tokenizer, True)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")

        env.on_main(write_files)
        storage = "files"
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(step, optimizer)
        try:
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        except Exception as exc:  # noqa: BLE001 - DCP reports every rank's error on every rank
            raise _write_error(tmp, exc) from None
        if full_model:
            _full_model_to(step, tmp / "model", tokenizer, env)
        storage = "dcp"
    torch.save(rng_state(), tmp / f"rng-rank{env.rank:05d}.pt")
    env.barrier()

    def finish() -> None:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        write_json_atomic(tmp / WORLD_FILE, {"world_size": env.world_size, "format": storage})
        write_json_atomic(tmp / "trainer_state.json", state.to_json())
        _swap_in(tmp, directory)

    env.on_main(finish)


def save_best_distributed(directory: Path, *, env, step: torch.nn.Module, tokenizer, lora: bool, metrics: dict) -> None:
    """:func:`save_best` for a distributed run: whole weights (or the adapter), written by rank 0."""
    from kdcache.student.distributed import unwrap

    tmp = directory.with_name(f".{directory.name}.tmp-dist")
    env.on_main(lambda: _fresh_dir(tmp))
    if lora:
        env.on_main(lambda: save_weights(unwrap(step).model, tmp, tokenizer, True))
    else:
        _full_model_to(step, tmp / "model", tokenizer, env)

    def finish() -> None:
        write_json_atomic(tmp / "eval.json", metrics)
        _swap_in(tmp, directory)

    env.on_main(finish)


def load_checkpoint_distributed(
    directory: Path, *, env, step: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, lora: bool, restore_rng: bool,
) -> TrainerState:
    """Restore a distributed run from ``directory`` on any number of ranks (the caller checked
    :func:`check_resume_layout`, which says whether the per-rank RNG states apply).

    Full fine-tuning loads weights and optimizer from ``dcp/``; LoRA runs were built from
    ``adapter/`` by the caller and load ``optimizer.pt`` here.
    """
    try:
        if lora:
            optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=False))
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_sd, optim_sd = get_state_dict(step, optimizer)
            dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / "dcp"))
            set_state_dict(step, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False))
        if restore_rng:
            set_rng_state(torch.load(rng_file(directory, env.rank), weights_only=False))
        return TrainerState.from_json(json.loads((directory / "trainer_state.json").read_text()))
    except KdcacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, pickling, DCP's CheckpointException
        raise KdcacheError(f"{directory}: damaged checkpoint ({first_line(exc)}); use --overwrite to restart") from None


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

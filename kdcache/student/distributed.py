"""Training under a ``torch.distributed`` launcher (torchrun, SLURM ``srun``, accelerate launch).

What this module holds, in the order :mod:`kdcache.student.train` uses it:

* :func:`detect_launch`: the rank layout from the launcher's environment: ``RANK`` /
  ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` (torchrun, accelerate
  launch, deepspeed, ``torch.distributed.run``), else an ``srun`` step of more than one task
  (``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS`` / ``SLURM_LOCALID``; the rendezvous host is the
  first node of ``SLURM_STEP_NODELIST`` and the port ``20000 + SLURM_JOB_ID % 10000`` unless
  ``MASTER_ADDR`` / ``MASTER_PORT`` are set). Nothing detected: a plain single process.
* :func:`init_distributed` -> :class:`DistEnv`: the process group (NCCL for CUDA tensors, gloo
  for CPU ones), one device per ``LOCAL_RANK``, and the few collectives the training loop needs
  (sums, gathers, rank-0-only work whose failure every rank learns about).
* :func:`shard_fsdp2` (full fine-tuning: FSDP2 per decoder layer, the embeddings + final norm,
  and the root holding the output layer) and :func:`wrap_ddp` (LoRA / QLoRA: DDP over the
  adapters, the frozen base replicated).
* :func:`lockstep`: FSDP2 all-gathers in every forward, so every rank must run as many micro-batches
  as the busiest one; the others run an empty padding micro-batch.
* failure reports: a rank that fails writes its one-line reason into the launcher's key-value
  store; a rank stopped by the loss of another (a collective that broke, or the launcher's
  SIGTERM) names the rank that failed, or the ranks that never said anything (killed).

Gradients are *summed* over ranks (each rank's loss is already divided by the global number of
supervised tokens), so N ranks compute the gradient one process computes on the same global
batch.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import nn

from kdcache.errors import KdcacheError, first_line

logger = logging.getLogger("kdcache")

T = TypeVar("T")

#: How long a rank waits in a collective (e.g. while rank 0 writes a checkpoint) before giving up.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
#: How long a rank stopped by another's failure waits for the others' reports before naming ranks.
REPORT_WAIT_S = 3.0
_STORE_PREFIX = "kdcache/"


@dataclass(frozen=True)
class Launch:
    """Rank layout given by a launcher. ``source`` says which one (for messages)."""

    rank: int
    world_size: int
    local_rank: int
    source: str
    master_addr: str | None = None
    master_port: int | None = None


def _int_env(environ: dict, name: str, source: str) -> int:
    try:
        return int(environ[name])
    except (KeyError, ValueError):
        raise KdcacheError(f"{source} launch: {name}={environ.get(name)!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[07-09,12],cpu1"`` -> ``"gpu07"``."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    match = re.match(r"^([^\[]*)\[([^\],-]+)[^\]]*\](.*)$", first)
    return first if match is None else match.group(1) + match.group(2) + match.group(3)


def detect_launch(environ: dict | None = None) -> Launch | None:
    """The launcher's rank layout, or None for a plain single process (see the module docstring).

    Raises:
        KdcacheError: the variables are there but unusable (not integers, rank out of range, no
            rendezvous address).
    """
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:
        source = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "launcher (RANK/WORLD_SIZE)"
        rank, world = _int_env(env, "RANK", source), _int_env(env, "WORLD_SIZE", source)
        if "LOCAL_RANK" in env:
            local = _int_env(env, "LOCAL_RANK", source)
        elif "SLURM_LOCALID" in env:
            local = _int_env(env, "SLURM_LOCALID", source)
        else:
            raise KdcacheError(f"{source} launch: RANK and WORLD_SIZE are set but LOCAL_RANK is not; "
                               "set LOCAL_RANK (the process's index on its machine) or start with torchrun")
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise KdcacheError(f"{source} launch: RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not; "
                               "set both (the rendezvous host and port) or start with torchrun")
        launch = Launch(rank, world, local, source)
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env and env["SLURM_STEP_NUM_TASKS"].strip() not in ("", "1"):
        source = "srun"
        rank, world = _int_env(env, "SLURM_PROCID", source), _int_env(env, "SLURM_STEP_NUM_TASKS", source)
        local = _int_env(env, "SLURM_LOCALID", source) if "SLURM_LOCALID" in env else 0
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = env.get("MASTER_ADDR") or (first_slurm_host(nodes) if nodes else None)
        if not addr:
            raise KdcacheError("srun launch: no SLURM_STEP_NODELIST to find the rendezvous host; set MASTER_ADDR")
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else 20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 10000
        launch = Launch(rank, world, local, source, addr, port)
    else:
        return None
    if world < 1 or not 0 <= launch.rank < world or launch.local_rank < 0:
        raise KdcacheError(f"{launch.source} launch: rank {launch.rank} of world size {world} (local rank "
                           f"{launch.local_rank}) is not a valid layout")
    return launch


def rank_device(name: str, launch: Launch) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` where CUDA exists, else the CPU.

    Raises:
        KdcacheError: ``--device cuda:N`` or ``mps`` (a launcher gives each rank its GPU), or more
            local ranks than GPUs.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise KdcacheError(f"--device {name}: under a launcher each rank uses the GPU of its LOCAL_RANK; "
                           "pass --device auto, cuda or cpu")
    if not torch.cuda.is_available():
        raise KdcacheError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise KdcacheError(f"rank {launch.rank}: LOCAL_RANK {launch.local_rank} but this machine has {count} GPU(s); "
                           f"start at most {count} processes per machine (torchrun --nproc_per_node {count})")
    return torch.device("cuda", launch.local_rank)


class LauncherStop(BaseException):
    """Raised in the main thread on SIGTERM: the launcher stops the ranks, usually because one failed."""


class RankError(KdcacheError):
    """A distributed run's error. ``quiet`` on ranks that only repeat what another rank prints."""

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


@dataclass
class DistEnv:
    """This process's place in the run. ``enabled`` is False for a plain single process, where
    every collective is the identity and ``on_main`` / ``agree`` just call their function."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    enabled: bool = False
    source: str = "single process"
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def all_gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's ``values`` (same length on each rank), in rank order."""
        if not self.enabled:
            return [list(values)]
        import torch.distributed as dist

        mine = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine)
        return [t.tolist() for t in out]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def max_int(self, value: int) -> int:
        if not self.enabled:
            return int(value)
        import torch.distributed as dist

        t = torch.tensor([int(value)], dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result (or its KdcacheError) to every rank.

        Also a barrier: no rank returns before rank 0 is done.
        """
        if not self.enabled:
            return fn()

        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except KdcacheError as exc:
                box[0] = ("error", str(exc))
            except BaseException as exc:
                box[0] = ("error", f"rank 0 failed: {first_line(exc)}")
                self._broadcast(box)
                raise
        self._broadcast(box)
        status, value = box[0]
        if status == "error":
            raise RankError(value, quiet=not self.is_main)
        return value

    def _broadcast(self, box: list) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list(box, src=0, device=self._comm_device)

    def agree(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; if it raised a KdcacheError on any rank, raise on all of them.

        The first failing rank prints the error, the others stay quiet. Use it around work
        that has no collectives inside (validation, loading), so no rank waits forever for one
        that already gave up.
        """
        if not self.enabled:
            return fn()
        import torch.distributed as dist

        error, result = None, None
        try:
            result = fn()
        except KdcacheError as exc:
            error = str(exc)
        errors: list[Any] = [None] * self.world_size
        dist.all_gather_object(errors, error)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            first_rank, message = failed[0]
            if any(e != message for _, e in failed) or len(failed) < self.world_size:
                message = f"rank {first_rank}: {message}"
            raise RankError(message, quiet=self.rank != first_rank)
        return result  # type: ignore[return-value]

    # ---------------------------------------------------------------- failure reports

    def _store(self):
        try:
            import torch.distributed as dist

            store = dist.distributed_c10d._get_default_store()
            store.set_timeout(timedelta(seconds=2))
            return store
        except Exception:  # noqa: BLE001 - reports are best effort
            return None

    def report_failure(self, message: str) -> None:
        """Leave this rank's one-line reason where the other ranks can read it (best effort)."""
        if not self.enabled:
            return
        store = self._store()
        if store is not None:
            try:
                store.set(f"{_STORE_PREFIX}failed/{self.rank}", message)
            except Exception:  # noqa: BLE001
                pass

    def lost_peer_message(self, where: str, hint: str) -> str:
        """One line for a rank stopped by another rank's failure, naming that rank if it can.

        Each stopped rank says it is alive; after :data:`REPORT_WAIT_S`, ranks that neither
        reported a failure nor said they are alive are named as silent (killed by a signal or
        the out-of-memory killer, or hung).
        """
        prefix = f"rank {self.rank}: stopped {where} because another rank failed"
        store = self._store()
        if store is None:
            return f"{prefix} (see its line or the launcher's summary); {hint}"
        failed: dict[int, str] = {}
        alive: set[int] = {self.rank}
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher's SIGTERM must not cut the report short
        try:
            store.set(f"{_STORE_PREFIX}alive/{self.rank}", "1")
            deadline = time.monotonic() + REPORT_WAIT_S
            while True:
                for r in range(self.world_size):
                    if r in alive or r in failed:
                        continue
                    if store.check([f"{_STORE_PREFIX}failed/{r}"]):
                        failed[r] = store.get(f"{_STORE_PREFIX}failed/{r}").decode(errors="replace")
                    elif store.check([f"{_STORE_PREFIX}alive/{r}"]):
                        alive.add(r)
                if len(alive) + len(failed) == self.world_size or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        except Exception:  # noqa: BLE001 - the store may live in the process that died
            pass
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        silent = [r for r in range(self.world_size) if r not in alive and r not in failed]
        if failed:
            r = min(failed)
            return f"rank {self.rank}: stopped {where} because rank {r} failed ({failed[r]}); {hint}"
        if silent:
            names = ", ".join(map(str, silent))
            return (f"rank {self.rank}: stopped {where} because rank {names} died without a message (killed by a signal "
                    f"or the out-of-memory killer, or hung; the launcher's summary has its exit status); {hint}")
        return f"{prefix} (see its line or the launcher's summary); {hint}"

    def close(self) -> None:
        if self.enabled and self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def init_distributed(device_name: str, launch: Launch | None = None) -> DistEnv | None:
    """Join the launcher's process group; None when no launcher started this process.

    Reuses a process group that the caller already initialized (e.g. a script run by
    ``accelerate launch`` calling :func:`kdcache.student.train.train_student`).
    """
    import torch.distributed as dist

    launch = launch or detect_launch()
    if launch is None:
        return None
    device = rank_device(device_name, launch)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        if launch.master_addr is not None:
            os.environ.setdefault("MASTER_ADDR", launch.master_addr)
            os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, timeout=COLLECTIVE_TIMEOUT,
                                    device_id=device if device.type == "cuda" else None)
        except (RuntimeError, ValueError) as exc:
            raise KdcacheError(f"rank {launch.rank}: cannot join the process group of {launch.world_size} ranks at "
                               f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({first_line(exc)}); "
                               "check that every rank was started with the same MASTER_ADDR/MASTER_PORT") from None
    elif dist.get_world_size() != launch.world_size or dist.get_rank() != launch.rank:
        raise KdcacheError(f"the process group already set up (rank {dist.get_rank()} of {dist.get_world_size()}) "
                           f"differs from the launcher's (rank {launch.rank} of {launch.world_size})")
    env = DistEnv(launch.rank, launch.world_size, launch.local_rank, device, True, launch.source, owns)
    if env.is_main:
        logger.info("distributed: %d ranks from %s, backend %s, rank 0 on %s", env.world_size, launch.source,
                    dist.get_backend(), device)
    return env


class sigterm_raises:
    """Within the block, SIGTERM (what torchrun sends the others when a rank fails) raises
    :class:`LauncherStop` in the main thread so the rank can say why it stops."""

    def __enter__(self):
        self._old = None
        if threading.current_thread() is threading.main_thread():
            def handler(_signum, _frame):
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process
                raise LauncherStop()

            self._old = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


# ------------------------------------------------------------------------- wrapping


def decoder_layers(body: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks of a transformers decoder body (``body.layers`` for Llama,
    Qwen, Mistral, Gemma, ...; else the longest ``ModuleList`` inside it)."""
    layers = getattr(body, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return list(layers)
    lists = [m for m in body.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise KdcacheError(f"{type(body).__name__}: cannot find the decoder layers to shard with FSDP2")
    return list(max(lists, key=len))


def shard_fsdp2(step: nn.Module, amp: torch.dtype | None, device: torch.device) -> nn.Module:
    """Shard a :class:`kdcache.student.modeling.StudentStep` (full fine-tuning) with FSDP2, in place.

    Units: every decoder layer; the body's own weights (embeddings, final norm) unless the
    embeddings are tied to the output layer; the root ``step`` with the output layer (and the
    tied embeddings). The loss calls the root's forward, so the root's weights, the lm_head
    among them, are gathered whole for :func:`kdcache.student.chunked.chunked_kd_loss` and its
    weight gradient is reduce-scattered after backward. Master weights stay in their dtype
    (float32 by default); with bf16 compute (``amp``) the gathered copies are bf16 and
    gradients are reduced in float32. Gradients are summed over ranks, not averaged. Weights
    still on the CPU move to ``device`` one unit at a time.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from kdcache.student.modeling import decoder_body, lm_head_params

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32 if amp is not None else None)
    body = decoder_body(step.model)
    for layer in decoder_layers(body):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    head_weight = lm_head_params(step.model)[0]
    if head_weight is not body.get_input_embeddings().weight:
        fully_shard(body, mesh=mesh, mp_policy=policy)
    fully_shard(step, mesh=mesh, mp_policy=policy)
    for module in step.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # SUM works on gloo and NCCL alike
    return step


def _sum_hook(_state, bucket):  # no annotations: DDP checks them, and they are strings here
    """DDP comm hook: all-reduce SUM (DDP's default divides by the world size)."""
    import torch.distributed as dist

    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_ddp(step: nn.Module, device: torch.device) -> nn.Module:
    """DDP over a LoRA/QLoRA :class:`~kdcache.student.modeling.StudentStep`: only the adapters
    train, so their gradients are all-reduced (summed) and the frozen base stays whole on
    every rank (bitsandbytes' 4-bit weights cannot be sharded by FSDP2)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    ddp = DDP(step, device_ids=ids, broadcast_buffers=False)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def unwrap(step: nn.Module) -> nn.Module:
    """The :class:`~kdcache.student.modeling.StudentStep` inside a DDP wrapper (or itself)."""
    return getattr(step, "module", step)


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def reshard(step: nn.Module) -> None:
    """Free the gathered weights FSDP2 keeps after a forward without backward (evaluation)."""
    from torch.distributed.fsdp import FSDPModule

    for module in step.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def lockstep(items: Iterator[T], env: DistEnv, padding: T) -> Iterator[tuple[T, bool]]:
    """``(item, True)`` for each of this rank's items, then ``(padding, False)`` until every
    rank ran out: all ranks take the same number of steps (FSDP2 gathers in every forward)."""
    it = iter(items)
    while True:
        item = next(it, None)
        if env.enabled and env.max_int(item is not None) == 0:
            return
        if item is None:
            if not env.enabled:
                return
            yield padding, False
        else:
            yield item, True

"""The cache arms: stage one (``generate_teacher_cache``) and stage two (``train_student``) of the
code under test, called through their Python APIs.

One cache per distinct teacher target: ``top<k>`` (top-k log-probs plus the tail mass,
deterministic, so shared by every seed and by the tail / renormalized / reverse-KL / JSD losses
at that ``k``) and ``rs<N>-s<seed>`` (N random draws per token, ``--top-k 0``; drawn again for
each training seed so the seed spread includes the sampling noise). Every cache is generated
from the same budget-limited training file, so all arms see the same tokens in the same order.
A cache at k = 128 is not truncated for smaller k: each k gets its own ``generate-teacher`` run
(cheap with a 135M teacher), which also makes each arm's bytes/token the real on-disk size.

:func:`train_from_cache` is the single adapter to stage two; it maps the benchmark's
:class:`~benchmarks.quality.hparams.TrainHParams` onto ``kdcache.student.train.TrainConfig``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.quality.hparams import TrainHParams

#: Rows per cache shard (``--shard-size``); train-student's seeded order depends on it, see
#: :func:`benchmarks.quality.tokens.stage_two_order`.
SHARD_SIZE = 1024


@dataclass(frozen=True)
class CacheSpec:
    """What a cache stores: ``top_k`` log-probs (+ tail), and/or ``samples`` draws per token:
    ``sampling`` "random" (full distribution) or "tail" (outside the top-k), made with
    ``draws`` "iid" or "systematic" (``--draws``)."""

    top_k: int = 0
    samples: int = 0
    seed: int = 0
    sampling: str = "random"
    draws: str = "iid"

    @property
    def name(self) -> str:
        if self.samples == 0:
            return f"top{self.top_k}"
        scheme = "-sys" if self.draws == "systematic" else ""
        if self.sampling == "tail":
            return f"top{self.top_k}-tail{self.samples}{scheme}-s{self.seed}"
        return f"rs{self.samples}{scheme}-s{self.seed}"


@dataclass
class StageResult:
    """What a stage-two run produced: the final model, its loss curve and timing."""

    model_dir: Path
    curve: list[dict]
    train_seconds: float
    tokens: int


def stage_one_missing() -> str | None:
    """Why stage one cannot run here (an import error message), or None."""
    try:
        import kdcache.teacher.generate  # noqa: F401
        import kdcache.teacher.loading  # noqa: F401
    except ImportError as exc:
        return f"kdcache stage one is not importable ({exc})"
    return None


def stage_two_missing() -> str | None:
    """Why stage two cannot run here (an import error message), or None."""
    try:
        from kdcache.student.train import TrainConfig, train_student  # noqa: F401
    except ImportError as exc:
        return f"kdcache stage two is not importable ({exc})"
    return None


def build_cache(
    spec: CacheSpec,
    *,
    teacher_dir: Path,
    dataset: Path,
    out_dir: Path,
    max_length: int,
    backend: str = "auto",
    dtype: str = "float32",
) -> tuple[dict, float]:
    """Run stage one for ``spec`` on ``dataset`` (reusing a finished cache); returns
    ``(manifest, seconds)`` (0 seconds when reused)."""
    from kdcache.teacher.generate import GenerateConfig, generate_teacher_cache

    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        return json.loads(manifest_path.read_text()), 0.0
    began = time.perf_counter()
    config = GenerateConfig(
        teacher=str(teacher_dir),
        dataset=str(dataset),
        output=str(out_dir),
        backend=backend,
        top_k=spec.top_k,
        sampling=spec.sampling if spec.samples else "none",
        samples=spec.samples or 50,
        draws=spec.draws,
        seed=spec.seed,
        max_length=max_length,
        shard_size=SHARD_SIZE,
        dtype=dtype,
        progress=False,
    )
    manifest = generate_teacher_cache(config)
    if manifest is None:
        raise RuntimeError(f"{out_dir}: generate_teacher_cache finished without a manifest")
    return manifest, time.perf_counter() - began


def _autocast_flag(hp: TrainHParams) -> str:
    return "bf16" if hp.dtype == "bfloat16" else "none"


# ------------------------------------------------------------------------------------------
# ADAPTER to stage two. Everything the benchmark knows about `kdcache train-student` is here.
# ------------------------------------------------------------------------------------------
def train_from_cache(
    *,
    student_dir: Path,
    cache_dir: Path,
    out_dir: Path,
    loss: str,
    hp: TrainHParams,
    seed: int,
    ce_weight: float = 0.0,
    jsd_beta: float = 0.5,
    eval_cache: Path | None = None,
    eval_every: int = 0,
    device: str = "auto",
) -> StageResult:
    """Train the student on ``cache_dir`` with ``kdcache.student.train.train_student``.

    Hyper-parameter mapping (benchmark -> TrainConfig): rows_per_step -> global_batch_size,
    micro_batch_tokens, lr, weight_decay, warmup_ratio, min_lr_ratio, max_grad_norm, seed;
    fixed: epochs 1, lr_scheduler cosine, shuffle True with one shard per window (the seeded
    order the references reproduce with :func:`~benchmarks.quality.tokens.stage_two_order`),
    dtype float32, autocast bf16 iff ``hp.dtype == "bfloat16"``, final_model "last" (every arm
    is judged at the end of its budget, as the references are). AdamW's betas/eps are
    train-student's fixed (0.9, 0.999) / 1e-8; ``hp`` must agree. The loss curve is the
    ``eval_ce`` that train-student logs on ``eval_cache`` every ``eval_every`` steps.
    """
    from kdcache.student.train import TrainConfig, train_student

    if (hp.adam_beta1, hp.adam_beta2, hp.adam_eps) != (0.9, 0.999, 1e-8):
        raise ValueError("train-student's AdamW uses betas (0.9, 0.999) and eps 1e-8; the references must too")
    config = TrainConfig(
        student=str(student_dir),
        cache=str(cache_dir),
        output=str(out_dir),
        eval_cache=str(eval_cache) if eval_cache else None,
        eval_every=eval_every,
        loss=loss,
        jsd_beta=jsd_beta,
        ce_weight=ce_weight,
        epochs=1,
        global_batch_size=hp.rows_per_step,
        micro_batch_tokens=hp.micro_batch_tokens,
        lr=hp.lr,
        weight_decay=hp.weight_decay,
        warmup_ratio=hp.warmup_ratio,
        lr_scheduler="cosine",
        min_lr_ratio=hp.min_lr_ratio,
        max_grad_norm=hp.max_grad_norm,
        seed=seed,
        device=device,
        dtype="float32",
        autocast=_autocast_flag(hp),
        shuffle=True,
        shuffle_window=1,
        final_model="last",
        save_every=0,
        progress=False,
        overwrite=True,
    )
    began = time.perf_counter()
    summary = train_student(config)
    seconds = time.perf_counter() - began
    curve = curve_from_metrics(out_dir / "metrics.jsonl")
    return StageResult(Path(summary["model"]), curve, seconds, int(summary["supervised_tokens"]))


def curve_from_metrics(path: Path) -> list[dict]:
    """``[{"tokens", "ce"}]`` from train-student's metrics JSONL: eval records, with the training
    tokens seen up to that step (summed from the train records)."""
    if not path.exists():
        return []
    tokens_at: dict[int, int] = {}
    total = 0
    curve = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "train":
            total += int(record.get("tokens", 0))
            tokens_at[int(record["step"])] = total
        elif record.get("type") == "eval" and "eval_ce" in record:
            ce = float(record["eval_ce"])
            if math.isfinite(ce):
                curve.append({"tokens": tokens_at.get(int(record["step"]), total), "ce": ce})
    return curve

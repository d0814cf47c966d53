"""Tokenize input rows with the teacher's tokenizer into :class:`TokenizedExample`\\ s.

What is supervised (``target_positions``), per format:

* ``text``: ``tokenizer(text)`` with the tokenizer's default special tokens (e.g. a BOS; not
  a second one when the text already begins with it, with one warning per run); every
  position from 1 on.
* ``prompt_response`` / ``alpaca`` as raw text (``chat_template_for_pairs=False``, or the
  tokenizer has no chat template): ``ids = tokenizer(prompt) + tokenizer(response,
  add_special_tokens=False) + [eos]`` -- the prompt keeps the default special tokens (a BOS,
  never a trailing EOS), the response is tokenized *separately* (so the token boundary at
  the seam is exactly the concatenation; a SentencePiece tokenizer may put a leading "▁" on
  the response), and the tokenizer's EOS is appended when it has one. Targets: the response
  tokens and that EOS. The Alpaca prompt is ``instruction + ("\\n\\n" + input if input) +
  "\\n\\n"`` (:func:`kdcache.data.formats.alpaca_prompt`).
* ``prompt_response`` / ``alpaca`` through the chat template (the default when the tokenizer
  has one): the conversation ``[{"role": "user", "content": prompt}, {"role": "assistant",
  "content": response}]`` (Alpaca user turn: ``instruction + ("\\n\\n" + input if input)``,
  without the trailing blank line) handled like ``messages``.
* ``messages``: rendered by ``tokenizer.apply_chat_template`` and tokenized without added
  special tokens (the template writes them). Targets: every assistant turn's tokens -- its
  content and the end-of-turn token the template writes after it (``<|im_end|>``,
  ``<|eot_id|>``, ...), but not the whitespace after that token nor the role header. They
  are found with ``return_assistant_tokens_mask`` when the template has ``{% generation %}``
  markers, otherwise by rendering prefixes: the tokens between ``render(messages[:j],
  add_generation_prompt=True)`` and ``render(messages[:j + 1])`` are assistant turn ``j``;
  both renderings must be token prefixes of the full one, else the row is rejected.

Then ``input_ids`` is cut to ``max_length`` (keeping the beginning), targets past the cut
and position 0 are dropped, and a row left without targets is a bad row.

* ``rollout`` (rows of ``kdcache rollout``): ``ids = prompt_ids + response_ids`` exactly as
  stored (never re-tokenized), targets the response tokens, and the example carries the
  rows' ``response_logprobs`` as ``rollout_logprobs`` (cut with the targets). A row whose
  ``tokenizer`` field names another vocabulary than this tokenizer's is a dataset-level
  error: the ids would mean other tokens.

``prompt_only=True`` (generate mode) gives ``input_ids`` = the prompt alone and no targets:
``text`` -> the text; raw pairs -> the prompt tokens; chat pairs -> the user turn plus the
generation prompt; ``messages`` -> the conversation without its final assistant turn (if it
ends with one) plus the generation prompt; ``rollout`` -> its ``prompt_ids``. A prompt of ``max_length`` tokens or more leaves
no room to generate and is a bad row. The response fields are optional in this mode.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from kdcache.data.example import TokenizedExample
from kdcache.data.formats import (
    MESSAGES,
    ChatRow,
    PairRow,
    RolloutRow,
    TextRow,
    detect_format_or_fail,
    normalize_format,
    parse_row,
)
from kdcache.errors import BadRowError, KdcacheError

logger = logging.getLogger("kdcache")

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_TEMPLATE_HINT = "fix the row, or pass --skip-bad-rows"
_PREFIX_HINT = (
    "the chat template renders a conversation prefix differently from the whole conversation; "
    "use a template with {% generation %} markers or convert the data to prompt/response rows"
)


@dataclass(frozen=True)
class SkippedRow:
    """A bad row skipped under ``skip_bad_rows=True``; it still owns its ``seq_id``.

    Attributes:
        seq_id: 0-based row index in the input stream.
        source: ``"path:row"`` (1-based).
        reason: one line saying what is wrong with the row.
    """

    seq_id: int
    source: str
    reason: str


def chat_template_of(tokenizer: Any) -> str | None:
    """The tokenizer's chat template text (all named templates joined), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        template = "\n".join(str(t) for t in template.values())
    return template or None


class RowTokenizer:
    """Turns one parsed row into a :class:`TokenizedExample` (see the module docstring).

    Args:
        tokenizer: a ``transformers`` tokenizer (the teacher's).
        max_length: maximum ``L`` in tokens, or None for no limit.
        prompt_only: generate mode: ``input_ids`` = rendered prompt, no targets.
        chat_template_for_pairs: render prompt/response and Alpaca rows through the chat
            template; default: True iff the tokenizer has a chat template.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int | None,
        *,
        prompt_only: bool = False,
        chat_template_for_pairs: bool | None = None,
    ) -> None:
        if max_length is not None and max_length < 2:
            raise KdcacheError(f"max_length must be at least 2 tokens, got {max_length}")
        self.tok = tokenizer
        self.max_length = max_length
        self.prompt_only = prompt_only
        template = chat_template_of(tokenizer)
        self.has_chat_template = template is not None
        if chat_template_for_pairs and not self.has_chat_template:
            raise KdcacheError("chat_template_for_pairs=True but the tokenizer has no chat template")
        self.pairs_as_chat = self.has_chat_template if chat_template_for_pairs is None else chat_template_for_pairs
        self.has_generation_markers = bool(template and _GENERATION_TAG.search(template))
        self.eos_id: int | None = getattr(tokenizer, "eos_token_id", None)
        self.bos_id: int | None = getattr(tokenizer, "bos_token_id", None)
        self._warned_double_bos = False
        self._source = ""  # the row being encoded, for warnings
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
            if getattr(added, "special", False):
                self.special_ids.add(int(token_id))
        self._blank_cache: dict[int, bool] = {}
        self._vocab_keys: dict[str, bool] = {}  # rollout `tokenizer` field -> matches this tokenizer

    # ------------------------------------------------------------------ public

    def encode(self, seq_id: int, source: str, row: Mapping[str, Any], fmt: str) -> TokenizedExample:
        """Tokenize ``row`` (format ``fmt``). Raises BadRowError for an unusable row."""
        self._source = source
        parsed = parse_row(row, fmt, source, need_response=not self.prompt_only)
        if isinstance(parsed, RolloutRow):
            return self._rollout_example(seq_id, source, parsed)
        if isinstance(parsed, ChatRow) or (isinstance(parsed, PairRow) and self.pairs_as_chat):
            if not self.has_chat_template:
                raise KdcacheError(
                    f"{source}: '{MESSAGES}' rows need a tokenizer with a chat template, and this one has none"
                )
        if self.prompt_only:
            return self._finish_prompt(seq_id, source, self._prompt_ids(parsed, source))
        ids, targets = self._ids_and_targets(parsed, source)
        return self._finish(seq_id, source, ids, targets)

    # ------------------------------------------------------------------ per format

    def _rollout_example(self, seq_id: int, source: str, parsed: RolloutRow) -> TokenizedExample:
        if parsed.tokenizer is not None:
            self._check_vocabulary(parsed.tokenizer, source)
        if self.prompt_only:
            return self._finish_prompt(seq_id, source, parsed.prompt_ids)
        start = len(parsed.prompt_ids)
        example = self._finish(seq_id, source, parsed.prompt_ids + parsed.response_ids,
                               list(range(start, start + len(parsed.response_ids))))
        kept = example.target_positions.shape[0]  # targets are cut only at the end
        example.rollout_logprobs = np.asarray(parsed.logprobs[:kept], dtype=np.float32)
        return example

    def _check_vocabulary(self, key: str, source: str) -> None:
        """A rollout row's ids must mean the same tokens here: its tokenizer's vocabulary
        (``"<size>:<sha256>"``) must equal this tokenizer's restricted to that size."""
        if key not in self._vocab_keys:
            from kdcache.student.compat import restricted_vocab_sha256

            size, _, digest = key.partition(":")
            self._vocab_keys[key] = (size.isdigit() and int(size) <= len(self.tok)
                                     and restricted_vocab_sha256(self.tok, int(size)) == digest)
        if not self._vocab_keys[key]:
            raise KdcacheError(f"{source}: the rollout's token ids come from another tokenizer than this one "
                               f"(vocabulary {key[:24]}...); score a rollout with a teacher that shares the student's "
                               "tokenizer")

    def _ids_and_targets(self, parsed: TextRow | PairRow | ChatRow, source: str) -> tuple[list[int], list[int]]:
        if isinstance(parsed, TextRow):
            ids = self._encode(parsed.text, True)
            return ids, list(range(1, len(ids)))
        if isinstance(parsed, PairRow) and not self.pairs_as_chat:
            prompt = self._encode_prompt(parsed.prompt)
            response = self._encode(parsed.response, False) + ([self.eos_id] if self.eos_id is not None else [])
            return prompt + response, list(range(len(prompt), len(prompt) + len(response)))
        messages = parsed.messages if isinstance(parsed, ChatRow) else _pair_messages(parsed)
        return self._chat_ids_and_targets(messages, source)

    def _prompt_ids(self, parsed: TextRow | PairRow | ChatRow, source: str) -> list[int]:
        if isinstance(parsed, TextRow):
            return self._encode(parsed.text, True)
        if isinstance(parsed, PairRow):
            if not self.pairs_as_chat:
                return self._encode_prompt(parsed.prompt)
            return self._render_ids([{"role": "user", "content": parsed.user_content}], True, source)
        messages = parsed.messages
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise BadRowError(source, "'messages' holds only an assistant turn; there is no prompt to generate from")
        return self._render_ids(messages, True, source)

    # ------------------------------------------------------------------ chat

    def _chat_ids_and_targets(self, messages: list[dict[str, Any]], source: str) -> tuple[list[int], list[int]]:
        if self.has_generation_markers:
            found = self._by_generation_mask(messages)
            if found is not None:
                return found
        return self.assistant_spans_by_prefixes(messages, source)

    def _by_generation_mask(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]] | None:
        """``return_assistant_tokens_mask`` (needs ``{% generation %}``); None if unusable."""
        try:
            out = self.tok.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
        except Exception:  # slow tokenizer, template error: the prefix method reports it
            return None
        ids, mask = [int(i) for i in out["input_ids"]], out.get("assistant_masks")
        targets = [i for i, m in enumerate(mask or []) if m]
        return (ids, targets) if targets else None

    def assistant_spans_by_prefixes(
        self, messages: list[dict[str, Any]], source: str
    ) -> tuple[list[int], list[int]]:
        """Full conversation ids and assistant target positions, by prefix rendering."""
        full = self._render_ids(messages, False, source)
        targets: list[int] = []
        for j, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if j == 0:
                raise BadRowError(
                    source, "messages[0] is an assistant turn; a conversation must start with a system or user turn"
                )
            start = self._render_ids(messages[:j], True, source)
            end = self._render_ids(messages[: j + 1], False, source)
            for prefix, what in ((start, f"messages[:{j}] + generation prompt"), (end, f"messages[:{j + 1}]")):
                if full[: len(prefix)] != prefix:
                    raise BadRowError(
                        source,
                        f"chat template is not prefix-stable: {what} is not a token prefix of the whole conversation",
                        hint=_PREFIX_HINT,
                    )
            targets.extend(self._trim_turn_end(full, len(start), len(end)))
        return full, targets

    def _trim_turn_end(self, ids: list[int], start: int, end: int) -> range:
        """``range(start, end)`` without whitespace tokens after the turn's last special token."""
        last_special = next((i for i in range(end - 1, start - 1, -1) if ids[i] in self.special_ids), None)
        if last_special is not None and all(self._is_blank(ids[i]) for i in range(last_special + 1, end)):
            end = last_special + 1
        return range(start, end)

    def _is_blank(self, token_id: int) -> bool:
        if token_id not in self._blank_cache:
            self._blank_cache[token_id] = not self.tok.decode([token_id]).strip()
        return self._blank_cache[token_id]

    def _render_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool, source: str) -> list[int]:
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja raise_exception, bad roles, ...
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            problem = f"the chat template rejected the conversation: {detail}"
            raise BadRowError(source, problem, hint=_TEMPLATE_HINT) from None
        return self._encode(text, False)

    # ------------------------------------------------------------------ helpers

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [int(i) for i in self.tok(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]]
        if add_special_tokens and self.bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == self.bos_id:
            # The text already begins with the BOS the tokenizer adds (a rendered chat pasted as
            # text): a second BOS would be stored, and supervised. Keep the text's own.
            if not self._warned_double_bos:
                self._warned_double_bos = True
                logger.warning("rows already begin with the tokenizer's BOS %r (e.g. %s); not adding another",
                               self.tok.bos_token, self._source)
            ids = ids[1:]
        return ids

    def _encode_prompt(self, prompt: str) -> list[int]:
        """The prompt with the tokenizer's leading special tokens, never a trailing EOS."""
        ids = self._encode(prompt, True)
        if ids and self.eos_id is not None and ids[-1] == self.eos_id:
            plain = self._encode(prompt, False)
            if not plain or plain[-1] != self.eos_id:
                ids = ids[:-1]
        return ids

    def _finish(self, seq_id: int, source: str, ids: list[int], targets: list[int]) -> TokenizedExample:
        limit = len(ids) if self.max_length is None else self.max_length
        kept = [t for t in targets if 1 <= t < limit]
        if not kept:
            if any(t >= limit for t in targets):
                problem = (
                    f"no supervised tokens within max_length={limit} "
                    f"(the first supervised token is at position {min(targets)})"
                )
            else:
                problem = "no supervised tokens (nothing to learn from this row)"
            raise BadRowError(source, problem, hint="raise --max-length, fix the row, or pass --skip-bad-rows")
        return TokenizedExample(
            seq_id, source, np.asarray(ids[:limit], dtype=np.int32), np.asarray(kept, dtype=np.int32)
        )

    def _finish_prompt(self, seq_id: int, source: str, ids: list[int]) -> TokenizedExample:
        if not ids:
            raise BadRowError(source, "the prompt renders to no tokens")
        if self.max_length is not None and len(ids) >= self.max_length:
            raise BadRowError(
                source,
                f"the prompt is {len(ids)} tokens, leaving no room to generate within max_length={self.max_length}",
                hint="raise --max-length, shorten the prompt, or pass --skip-bad-rows",
            )
        return TokenizedExample(seq_id, source, np.asarray(ids, dtype=np.int32), np.zeros(0, dtype=np.int32))


def _pair_messages(pair: PairRow) -> list[dict[str, Any]]:
    return [{"role": "user", "content": pair.user_content}, {"role": "assistant", "content": pair.response}]


def tokenize_rows(
    rows: Iterable[tuple[int, str, Any]],
    tokenizer: Any,
    max_length: int | None,
    fmt: str | None = None,
    *,
    skip_bad_rows: bool = False,
    prompt_only: bool = False,
    chat_template_for_pairs: bool | None = None,
) -> Iterator[TokenizedExample | SkippedRow]:
    """Tokenize a stream of ``(seq_id, source, row)`` (as from ``InputDataset.rows()``).

    ``row`` is a dict, or a ``BadRowError`` instance for a row the reader could not parse.
    ``fmt`` None detects the format from the first dict row (a row matching no format is a
    dataset-level ``KdcacheError``, never skipped).

    Yields one item per input row, in order: a :class:`TokenizedExample`, or -- for a bad
    row when ``skip_bad_rows`` -- a :class:`SkippedRow` with the same ``seq_id``.

    Raises:
        BadRowError: the first bad row, when not ``skip_bad_rows``.
        KdcacheError: a problem that is not about one row (no chat template, bad options).
    """
    encoder = RowTokenizer(
        tokenizer, max_length, prompt_only=prompt_only, chat_template_for_pairs=chat_template_for_pairs
    )
    fmt = normalize_format(fmt) if fmt else None
    for seq_id, source, row in rows:
        try:
            if isinstance(row, BadRowError):
                raise row
            if not isinstance(row, Mapping):
                raise BadRowError(source, f"expected an object row, got {type(row).__name__}")
            if fmt is None:
                fmt = detect_format_or_fail(row, source)
            yield encoder.encode(seq_id, source, row, fmt)
        except BadRowError as err:
            if not skip_bad_rows:
                raise
            yield SkippedRow(seq_id, source, err.problem)

"""Input row formats: detection and validation.

Four formats are understood (canonical name first, accepted aliases in brackets):

* ``text`` -- ``{"text": str}``: plain language-model data, every token after the first
  is supervised.
* ``prompt_response`` [``prompt``, ``pairs``, ``prompt_completion``] --
  ``{"prompt": str, "response": str}`` or ``{"prompt": str, "completion": str}``: the
  prompt is context only, the response is supervised.
* ``alpaca`` [``instruction``] -- ``{"instruction": str, "input": str (optional),
  "output": str}``: turned into a prompt/response pair, see :func:`alpaca_prompt`.
* ``messages`` [``chat``] -- ``{"messages": [{"role": str, "content": str}, ...]}``:
  rendered with the tokenizer's chat template, assistant turns are supervised.
* ``rollout`` -- rows written by ``kdcache rollout`` (:mod:`kdcache.rollout.rows`):
  ``{"prompt_ids": [int], "response_ids": [int], "response_logprobs": [float], ...}``.
  The ids are used as they are (never re-tokenized: re-tokenizing the text can change the
  tokens the student sampled); the response tokens are supervised and each carries the
  sampling policy's log-prob of that token.

Detection looks at the keys of one row, in this order: ``prompt_ids`` + ``response_ids``,
``messages``, ``instruction``, ``prompt``, ``text`` (so a row carrying both ``messages`` and
``text`` is a chat row, and a rollout row, which also has ``prompt`` text, is a rollout row).
A ``prompt`` row with neither ``response`` nor ``completion`` is still ``prompt_response``;
it is usable only for prompt-only (generate mode) tokenization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from kdcache.errors import BadRowError, KdcacheError

TEXT = "text"
PROMPT_RESPONSE = "prompt_response"
ALPACA = "alpaca"
MESSAGES = "messages"
ROLLOUT = "rollout"
FORMATS: tuple[str, ...] = (TEXT, PROMPT_RESPONSE, ALPACA, MESSAGES, ROLLOUT)

_ALIASES = {
    "prompt": PROMPT_RESPONSE,
    "pairs": PROMPT_RESPONSE,
    "prompt_completion": PROMPT_RESPONSE,
    "prompt-response": PROMPT_RESPONSE,
    "instruction": ALPACA,
    "chat": MESSAGES,
}

# What each format needs, for error messages.
_EXPECTED = {
    TEXT: "'text'",
    PROMPT_RESPONSE: "'prompt' and 'response' (or 'completion')",
    ALPACA: "'instruction', optional 'input', and 'output'",
    MESSAGES: "'messages' (a list of {role, content} objects)",
    ROLLOUT: "'prompt_ids', 'response_ids' and 'response_logprobs' (rows written by kdcache rollout)",
}

#: Largest log-prob accepted in a rollout row (float32 rounding can put a certain token a hair above 0).
LOGPROB_SLACK = 1e-3


def normalize_format(fmt: str) -> str:
    """Canonical format name for ``fmt`` (a name from :data:`FORMATS` or an alias)."""
    name = str(fmt).strip().lower()
    name = _ALIASES.get(name, name)
    if name not in FORMATS:
        raise KdcacheError(
            f"unknown input format {fmt!r} (choose one of: {', '.join(FORMATS)}; "
            f"aliases: {', '.join(sorted(_ALIASES))})"
        )
    return name


def detect_format(row: Mapping[str, Any]) -> str | None:
    """Format of one row from its keys, or ``None`` when no format matches."""
    if "prompt_ids" in row and "response_ids" in row:
        return ROLLOUT
    if "messages" in row:
        return MESSAGES
    if "instruction" in row:
        return ALPACA
    if "prompt" in row:
        return PROMPT_RESPONSE
    if "text" in row:
        return TEXT
    return None


def detect_format_or_fail(row: Mapping[str, Any], source: str) -> str:
    """:func:`detect_format`, raising a dataset-level :class:`KdcacheError` if nothing matches."""
    fmt = detect_format(row)
    if fmt is None:
        keys = ", ".join(repr(k) for k in list(row)[:12]) or "none"
        raise KdcacheError(
            f"{source}: cannot detect the input format from this row (keys: {keys}); expected "
            "'text', 'prompt'+'response', 'prompt'+'completion', 'instruction'+'output' or "
            "'messages' (rename the fields, or force a format with --format)"
        )
    return fmt


@dataclass(frozen=True)
class TextRow:
    """A ``text`` row."""

    text: str


@dataclass(frozen=True)
class PairRow:
    """A prompt/response pair (``prompt_response`` or ``alpaca``).

    Attributes:
        prompt: the raw-text prompt, exactly as tokenized before the response.
        response: the supervised text, ``None`` when the row has none (prompt-only use).
        user_content: the user turn when the pair is rendered through a chat template.
    """

    prompt: str
    response: str | None
    user_content: str


@dataclass(frozen=True)
class ChatRow:
    """A ``messages`` row: validated messages, each a dict with string role and content."""

    messages: list[dict[str, Any]]


@dataclass(frozen=True)
class RolloutRow:
    """A ``rollout`` row: token ids as sampled, and the sampling policy's log-prob per response token.

    Attributes:
        prompt_ids: the prompt's token ids (non-empty).
        response_ids: the sampled tokens (empty only in prompt-only use).
        logprobs: ``log mu`` of each response token (same length as ``response_ids``).
        tokenizer: ``"<vocab_size>:<vocab_sha256>"`` of the tokenizer that made the ids, or None.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    tokenizer: str | None


ParsedRow = TextRow | PairRow | ChatRow | RolloutRow


def alpaca_prompt(instruction: str, input_text: str | None) -> tuple[str, str]:
    """The Alpaca prompt template.

    Returns ``(prompt, user_content)`` where::

        user_content = instruction + ("\\n\\n" + input if input.strip() else "")
        prompt       = user_content + "\\n\\n"

    ``prompt`` is used when tokenizing raw text (the response follows it directly);
    ``user_content`` is the user turn when rendering through a chat template.
    """
    user = instruction + ("\n\n" + input_text if input_text and input_text.strip() else "")
    return user + "\n\n", user


def parse_row(row: Mapping[str, Any], fmt: str, source: str, need_response: bool = True) -> ParsedRow:
    """Validate ``row`` as format ``fmt`` and extract its fields.

    Raises:
        BadRowError: a field is missing, null, of the wrong type, or (for supervised text)
            empty / whitespace-only. The message names ``source``, the field and ``fmt``.
    """
    if fmt == TEXT:
        return TextRow(_nonempty_str(row, "text", fmt, source))
    if fmt == PROMPT_RESPONSE:
        prompt = _str_field(row, "prompt", fmt, source)
        key = "response" if row.get("response") is not None or "completion" not in row else "completion"
        response = _nonempty_str(row, key, fmt, source) if need_response else _optional_str(row, key, fmt, source)
        return PairRow(prompt, response, prompt)
    if fmt == ALPACA:
        instruction = _nonempty_str(row, "instruction", fmt, source)
        input_text = _optional_str(row, "input", fmt, source)
        get_output = _nonempty_str if need_response else _optional_str
        output = get_output(row, "output", fmt, source)
        prompt, user = alpaca_prompt(instruction, input_text)
        return PairRow(prompt, output, user)
    if fmt == MESSAGES:
        return ChatRow(_messages(row, source, need_response))
    if fmt == ROLLOUT:
        return _rollout(row, source, need_response)
    raise KdcacheError(f"unknown input format {fmt!r}")


def reference_text(row: Mapping[str, Any], fmt: str) -> str | None:
    """The reference response of a row, for metrics on generations (None when it has none).

    ``prompt_response``: ``response`` (or ``completion``); ``alpaca``: ``output``;
    ``messages``: the content of the final turn if it is the assistant's; ``rollout``: its
    ``reference`` field (copied from the prompt's row by ``kdcache rollout``); ``text``: None.
    """
    if fmt == PROMPT_RESPONSE:
        value = row.get("response") if row.get("response") is not None else row.get("completion")
    elif fmt == ALPACA:
        value = row.get("output")
    elif fmt == MESSAGES:
        messages = row.get("messages") or []
        last = messages[-1] if isinstance(messages, (list, tuple)) and messages else None
        value = last.get("content") if isinstance(last, Mapping) and last.get("role") == "assistant" else None
    elif fmt == ROLLOUT:
        value = row.get("reference")
    else:
        value = None
    return value if isinstance(value, str) and value.strip() else None


def _missing(row: Mapping[str, Any], key: str, fmt: str, source: str) -> BadRowError:
    what = "is null" if key in row else "is missing"
    return BadRowError(source, f"field {key!r} {what} (format {fmt!r} needs {_EXPECTED[fmt]})")


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(type(value), type(value).__name__)


def _str_field(row: Mapping[str, Any], key: str, fmt: str, source: str) -> str:
    value = row.get(key)
    if value is None:
        raise _missing(row, key, fmt, source)
    if not isinstance(value, str):
        raise BadRowError(source, f"field {key!r} must be a string, got {_type_name(value)} (format {fmt!r})")
    return value


def _nonempty_str(row: Mapping[str, Any], key: str, fmt: str, source: str) -> str:
    value = _str_field(row, key, fmt, source)
    if not value.strip():
        raise BadRowError(source, f"field {key!r} is empty or whitespace-only (format {fmt!r})")
    return value


def _optional_str(row: Mapping[str, Any], key: str, fmt: str, source: str) -> str | None:
    return None if row.get(key) is None else _str_field(row, key, fmt, source)


def _int_list(row: Mapping[str, Any], key: str, source: str) -> list[int]:
    value = row.get(key)
    if value is None:
        raise _missing(row, key, ROLLOUT, source)
    if not isinstance(value, (list, tuple)) and not hasattr(value, "tolist"):
        raise BadRowError(source, f"field {key!r} must be a list of token ids, got {_type_name(value)}")
    items = value.tolist() if hasattr(value, "tolist") else list(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise BadRowError(source, f"field {key!r} must hold non-negative integer token ids")
    return items


def _rollout(row: Mapping[str, Any], source: str, need_response: bool) -> RolloutRow:
    prompt = _int_list(row, "prompt_ids", source)
    if not prompt:
        raise BadRowError(source, "field 'prompt_ids' is empty")
    response = _int_list(row, "response_ids", source)
    if need_response and not response:
        raise BadRowError(source, "field 'response_ids' is empty (nothing to supervise)")
    raw = row.get("response_logprobs")
    if raw is None:
        raise _missing(row, "response_logprobs", ROLLOUT, source)
    values = raw.tolist() if hasattr(raw, "tolist") else raw
    if not isinstance(values, (list, tuple)) or len(values) != len(response):
        got = len(values) if isinstance(values, (list, tuple)) else _type_name(values)
        raise BadRowError(source, f"field 'response_logprobs' must hold one log-prob per response token "
                                  f"({len(response)}), got {got}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and -math.inf < v <= LOGPROB_SLACK
               for v in values):
        raise BadRowError(source, "field 'response_logprobs' must hold finite log-probs <= 0")
    tokenizer = row.get("tokenizer")
    return RolloutRow(prompt, response, [min(float(v), 0.0) for v in values],
                      tokenizer if isinstance(tokenizer, str) else None)


def _messages(row: Mapping[str, Any], source: str, need_assistant: bool) -> list[dict[str, Any]]:
    messages = row.get("messages")
    if messages is None:
        raise _missing(row, "messages", MESSAGES, source)
    if not isinstance(messages, (list, tuple)):
        raise BadRowError(
            source, f"field 'messages' must be a list of {{role, content}} objects, got {_type_name(messages)}"
        )
    if not messages:
        raise BadRowError(source, "field 'messages' is an empty list")
    out = []
    for j, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRowError(
                source, f"messages[{j}] must be an object with 'role' and 'content', got {_type_name(message)}"
            )
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise BadRowError(source, f"messages[{j}] has no string 'role'")
        if not isinstance(content, str):
            got = "none" if content is None else _type_name(content)
            raise BadRowError(source, f"messages[{j}] ({role}) needs a string 'content', got {got}")
        if role == "assistant" and not content.strip():
            raise BadRowError(source, f"messages[{j}] (assistant) has empty or whitespace-only content")
        out.append({k: v for k, v in message.items() if v is not None})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise BadRowError(source, "'messages' has no assistant turn to supervise")
    return out

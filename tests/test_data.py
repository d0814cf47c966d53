"""Input data layer: readers, format detection, tokenization, bad-row handling."""

from __future__ import annotations

import copy
import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from kdcache.data import (
    SkippedRow,
    TokenizedExample,
    alpaca_prompt,
    detect_format,
    iter_jsonl,
    iter_jsonl_zst,
    iter_parquet,
    normalize_format,
    open_dataset,
    tokenize_rows,
)
from kdcache.data.tokenize import RowTokenizer
from kdcache.errors import BadRowError, KdcacheError
from tests.conftest import CORPUS, wiki_texts

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, the capital of Italy."},
]


# ----------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def tok():
    """Tiny ChatML tokenizer whose template has {% generation %} markers; EOS <|im_end|>, no BOS."""
    from kdcache.testing.models import train_tokenizer

    return train_tokenizer(CORPUS + wiki_texts(40))


@pytest.fixture(scope="module")
def tok_nogen(tok):
    """The tiny tokenizer with the {% generation %} markers stripped from its template."""
    plain = copy.deepcopy(tok)
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    return plain


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    """The real SmolLM2-135M-Instruct tokenizer (template without generation markers)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_zst(path: Path, rows: list, frames: int = 1) -> Path:
    import zstandard

    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    cut = [len(data) * i // frames for i in range(frames + 1)]
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(data[a:b]) for a, b in zip(cut, cut[1:])))
    return path


def write_parquet(path: Path, rows: list, row_group_size: int = 1000) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def one(tokenizer, row, fmt=None, max_length=256, **kw) -> TokenizedExample:
    (item,) = list(tokenize_rows([(0, "mem:1", row)], tokenizer, max_length, fmt, **kw))
    return item


def targets_text(tokenizer, ex: TokenizedExample) -> str:
    return tokenizer.decode(ex.input_ids[ex.target_positions].tolist())


def bad(tokenizer, row, fmt=None, max_length=256, **kw) -> str:
    with pytest.raises(BadRowError) as info:
        one(tokenizer, row, fmt, max_length, **kw)
    message = str(info.value)
    assert "\n" not in message and message.startswith("mem:1: ")
    return message


def assert_valid(ex: TokenizedExample, max_length: int | None = None) -> None:
    assert ex.input_ids.dtype == np.int32 and ex.target_positions.dtype == np.int32
    assert ex.input_ids.ndim == 1 and ex.target_positions.ndim == 1
    t = ex.target_positions
    assert len(t) > 0 and t[0] >= 1 and t[-1] < len(ex.input_ids) and np.all(np.diff(t) > 0)
    if max_length is not None:
        assert len(ex.input_ids) <= max_length


ROWS = [{"text": f"row number {i} about the quick brown fox"} for i in range(7)]


# ----------------------------------------------------------------------------- readers


def test_jsonl_reader_sources_use_line_numbers_and_skip_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('\ufeff{"text": "one"}\n\n{"text": "two"}\r\n   \n{"text": "three"}')
    rows = list(open_dataset(path).rows())
    assert [(s, src, r["text"]) for s, src, r in rows] == [
        (0, f"{path}:1", "one"),
        (1, f"{path}:3", "two"),
        (2, f"{path}:5", "three"),
    ]


def test_zst_reader_multiframe_equals_jsonl(tmp_path):
    plain = write_jsonl(tmp_path / "a.jsonl", ROWS)
    packed = write_zst(tmp_path / "a.jsonl.zst", ROWS, frames=3)
    got = [(s, r) for s, _, r in open_dataset(packed).rows()]
    assert got == [(s, r) for s, _, r in open_dataset(plain).rows()]
    assert [src for src, _ in iter_jsonl_zst(packed)][-1] == f"{packed}:7"


def test_parquet_reader_streams_batches_and_nested_columns(tmp_path):
    rows = [{"messages": CHAT, "id": i} for i in range(2500)]
    path = write_parquet(tmp_path / "c.parquet", rows, row_group_size=700)
    got = list(iter_parquet(path, batch_size=300))
    assert len(got) == 2500
    assert got[0] == (f"{path}:1", rows[0]) and got[-1] == (f"{path}:2500", rows[-1])
    ds = open_dataset(path)
    assert ds.format == "messages" and ds.num_rows_hint() == 2500


def test_datasets_dir_and_datasetdict_split(tmp_path):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    ds = open_dataset(single)
    rows = list(ds.rows())
    assert [r["text"] for _, _, r in rows] == [r["text"] for r in ROWS]
    assert rows[2][:2] == (2, f"{single}:3")
    assert ds.describe()["kind"] == "datasets_dir" and ds.describe()["format"] == "text"

    multi = tmp_path / "multi"
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_list([{"prompt": "p", "response": "r"}])
    ).save_to_disk(str(multi))
    test_split = open_dataset(multi, split="test")
    assert [r for _, _, r in test_split.rows()] == [{"prompt": "p", "response": "r"}]
    assert test_split.format == "prompt_response"
    assert next(iter(test_split.rows()))[1] == f"{multi / 'test'}:1"
    with pytest.raises(KdcacheError, match="no split 'validation'"):
        open_dataset(multi, split="validation")
    assert open_dataset(multi).fingerprint() != test_split.fingerprint()
    assert open_dataset(single).fingerprint() == ds.fingerprint()


def test_directory_and_glob_are_sorted_and_seq_ids_continue(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write_jsonl(data / "b.jsonl", ROWS[2:4])
    write_zst(data / "a.jsonl.zst", ROWS[0:2])
    write_parquet(data / "sub" / "c.parquet", ROWS[4:7])
    (data / "README.md").write_text("not data")
    (data / ".hidden.jsonl").write_text("{broken\n")
    ds = open_dataset(data)
    got = list(ds.rows())
    assert [s for s, _, _ in got] == list(range(7))
    assert [r for _, _, r in got] == ROWS
    assert [Path(p).name for p in ds.describe()["files"]] == ["a.jsonl.zst", "b.jsonl", "c.parquet"]
    by_glob = open_dataset(str(data / "*.jsonl*"))
    assert [r for _, _, r in by_glob.rows()] == ROWS[0:4]
    by_glob_rec = open_dataset(str(data / "**" / "*.parquet"))
    assert [src for _, src, _ in by_glob_rec.rows()][0].endswith("c.parquet:1")


def test_readers_stream_without_loading_the_file(tmp_path):
    line = json.dumps({"text": "x" * 200}) + "\n"
    rows = 60_000  # ~13 MB
    plain = tmp_path / "big.jsonl"
    with open(plain, "w") as handle:
        for _ in range(rows):
            handle.write(line)
    import zstandard

    packed = tmp_path / "big.jsonl.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    for reader, path in ((iter_jsonl, plain), (iter_jsonl_zst, packed)):
        tracemalloc.start()
        count = sum(1 for _ in reader(path))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == rows
        assert peak < 4 << 20, f"{reader.__name__} peaked at {peak} bytes for a {plain.stat().st_size} byte file"


def test_hub_name_failure_is_one_line(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for spec in ("someone/no-such-dataset", "hf:someone/no-such-dataset"):
        with pytest.raises(KdcacheError) as info:
            open_dataset(spec)
        message = str(info.value)
        assert message.startswith(f"{spec}: ") and "hub" in message and "\n" not in message


def test_fingerprint_tracks_content_not_location(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = write_jsonl(tmp_path / "x" / "d.jsonl", ROWS)
    b = Path(shutil.copy(a, tmp_path / "y" / "d.jsonl"))
    fa, fb = open_dataset(a).fingerprint(), open_dataset(b).fingerprint()
    assert fa == fb and len(fa) == 64
    write_jsonl(b, ROWS[:-1] + [{"text": "changed"}])
    assert open_dataset(b).fingerprint() != fa
    assert open_dataset(tmp_path / "x").fingerprint() != open_dataset(tmp_path / "y").fingerprint()


# ----------------------------------------------------------------------------- file-level errors


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(KdcacheError, match=r"nope\.jsonl: no such file or directory"):
        open_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(KdcacheError, match="no such file"):
        list(iter_jsonl(tmp_path / "gone.jsonl"))
    (tmp_path / "d.json").write_text("[]")
    with pytest.raises(KdcacheError, match=r"d\.json: unsupported file type"):
        open_dataset(tmp_path / "d.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdcacheError, match="holds no .jsonl"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(KdcacheError, match="matches no"):
        open_dataset(str(tmp_path / "*.parquet"))
    with pytest.raises(KdcacheError, match="unknown input format 'csv'"):
        open_dataset(write_jsonl(tmp_path / "ok.jsonl", ROWS), fmt="csv")


def test_corrupt_zst(tmp_path):
    garbage = tmp_path / "g.jsonl.zst"
    garbage.write_bytes(b"this is not zstd" * 50)
    with pytest.raises(KdcacheError, match=r"g\.jsonl\.zst: corrupt zstd data"):
        list(open_dataset(garbage).rows())
    truncated = write_zst(tmp_path / "t.jsonl.zst", ROWS * 50)
    truncated.write_bytes(truncated.read_bytes()[:-20])
    with pytest.raises(KdcacheError, match=r"t\.jsonl\.zst: zstd stream is truncated"):
        list(open_dataset(truncated).rows())


def test_corrupt_parquet(tmp_path):
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"PAR1 but not really" * 10)
    with pytest.raises(KdcacheError, match=r"g\.parquet: not a readable Parquet file"):
        list(open_dataset(garbage).rows())
    rng = np.random.default_rng(0)
    words = np.array(["fox", "dog", "cat", "the", "a", "jumps", "over", "lazy"])
    rows = [{"text": " ".join(rng.choice(words, 20))} for _ in range(3000)]
    good = write_parquet(tmp_path / "t.parquet", rows, row_group_size=500)
    blob = bytearray(good.read_bytes())
    middle = len(blob) // 2
    blob[middle : middle + 200] = b"\xff" * 200  # smash a data page mid-file, keep the footer
    good.write_bytes(bytes(blob))
    got = []
    with pytest.raises(KdcacheError) as info:
        for _, source, _ in open_dataset(good).rows():
            got.append(source)
    assert str(info.value).startswith(f"{good}: corrupt Parquet data after row {len(got)} (")
    assert 0 < len(got) < 3000 and got[-1] == f"{good}:{len(got)}"


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"text": "a"}, "text"),
        ({"prompt": "a", "response": "b"}, "prompt_response"),
        ({"prompt": "a", "completion": "b"}, "prompt_response"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"messages": [], "text": "a"}, "messages"),
        ({"question": "a"}, None),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_detection_uses_first_parseable_row_and_can_be_forced(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ["{oops", {"prompt": "Say hi.", "response": "Hi."}, {"text": "plain"}])
    assert open_dataset(path).format == "prompt_response"
    forced = open_dataset(path, fmt="text")
    assert forced.describe()["format"] == "text" and forced.describe()["format_forced"]
    items = list(forced.examples(tok, 64, skip_bad_rows=True))
    assert isinstance(items[1], SkippedRow) and "field 'text' is missing" in items[1].reason and "'text'" in items[1].reason
    assert isinstance(items[2], TokenizedExample) and items[2].seq_id == 2
    assert normalize_format("chat") == "messages" and normalize_format("pairs") == "prompt_response"


def test_undetectable_format_is_a_dataset_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(KdcacheError) as info:
        open_dataset(path).format
    assert not isinstance(info.value, BadRowError)
    assert f"{path}:1" in str(info.value) and "'question'" in str(info.value)
    with pytest.raises(KdcacheError, match="cannot detect"):  # not skipped even when skipping rows
        list(tokenize_rows(open_dataset(path).rows(), tok, 64, skip_bad_rows=True))


# ----------------------------------------------------------------------------- tokenization: formats


def test_text_all_positions_from_one(tok):
    text = wiki_texts(3)[2]
    ex = one(tok, {"text": text})
    ids = tok(text)["input_ids"]
    assert ex.input_ids.tolist() == ids[:256]
    assert ex.target_positions.tolist() == list(range(1, min(256, len(ids))))
    assert ex.seq_id == 0 and ex.source == "mem:1"


def test_pairs_raw_concatenation_and_eos(tok):
    row = {"prompt": "The capital of France is", "response": " Paris."}
    ex = one(tok, row, chat_template_for_pairs=False)
    prompt_ids = tok(row["prompt"])["input_ids"]
    response_ids = tok(row["response"], add_special_tokens=False)["input_ids"]
    assert ex.input_ids.tolist() == prompt_ids + response_ids + [tok.eos_token_id]
    assert ex.target_positions.tolist() == list(range(len(prompt_ids), len(ex.input_ids)))
    assert targets_text(tok, ex) == " Paris.<|im_end|>"
    completion = one(tok, {"prompt": row["prompt"], "completion": row["response"]}, chat_template_for_pairs=False)
    assert completion.input_ids.tolist() == ex.input_ids.tolist()


def test_alpaca_raw_template(tok):
    ex = one(tok, {"instruction": "Add the numbers.", "input": "12 and 345", "output": "357"}, chat_template_for_pairs=False)
    first = int(ex.target_positions[0])
    assert tok.decode(ex.input_ids[:first].tolist()) == "Add the numbers.\n\n12 and 345\n\n"
    assert targets_text(tok, ex) == "357<|im_end|>"
    no_input = one(tok, {"instruction": "Name a fox.", "input": "  ", "output": "Brown"}, chat_template_for_pairs=False)
    assert tok.decode(no_input.input_ids.tolist()) == "Name a fox.\n\nBrown<|im_end|>"
    assert alpaca_prompt("I", "x") == ("I\n\nx\n\n", "I\n\nx") and alpaca_prompt("I", None) == ("I\n\n", "I")


def test_pairs_and_alpaca_through_chat_template_by_default(tok):
    ex = one(tok, {"prompt": "Where is Rome?", "response": "In Italy."})
    assert tok.decode(ex.input_ids.tolist()) == (
        "<|im_start|>user\nWhere is Rome?<|im_end|>\n<|im_start|>assistant\nIn Italy.<|im_end|>\n"
    )
    assert targets_text(tok, ex) == "In Italy.<|im_end|>"
    al = one(tok, {"instruction": "Add.", "input": "1 and 2", "output": "3"})
    assert tok.decode(al.input_ids.tolist()).startswith("<|im_start|>user\nAdd.\n\n1 and 2<|im_end|>\n")
    assert targets_text(tok, al) == "3<|im_end|>"


def test_messages_tiny_generation_mask_matches_prefix_method(tok):
    ex = one(tok, {"messages": CHAT})
    assert_valid(ex)
    assert targets_text(tok, ex) == "Paris.<|im_end|>Rome, the capital of Italy.<|im_end|>"
    encoder = RowTokenizer(tok, None)
    assert encoder.has_generation_markers
    ids, targets = encoder.assistant_spans_by_prefixes(CHAT, "mem:1")
    assert ids == ex.input_ids.tolist() and targets == ex.target_positions.tolist()


def test_messages_prefix_method_on_tiny_template_without_markers(tok, tok_nogen):
    assert not RowTokenizer(tok_nogen, None).has_generation_markers
    for messages in (CHAT, CHAT[1:3]):
        masked, prefixed = one(tok, {"messages": messages}), one(tok_nogen, {"messages": messages})
        assert np.array_equal(masked.input_ids, prefixed.input_ids)
        assert np.array_equal(masked.target_positions, prefixed.target_positions)
    # an assistant-first conversation has no prefix to render: a bad row on this path
    message = bad(tok_nogen, {"messages": [{"role": "assistant", "content": "hi"}]})
    assert "messages[0] is an assistant turn" in message


def test_messages_smollm2_prefix_masking(smol):
    encoder = RowTokenizer(smol, None)
    assert not encoder.has_generation_markers  # the real template has no {% generation %}
    for messages in (CHAT, CHAT[1:]):  # with and without a system turn (template adds a default one)
        ex = one(smol, {"messages": messages}, max_length=4096)
        assert_valid(ex)
        assert ex.input_ids.tolist() == list(smol.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        assert targets_text(smol, ex) == "Paris.<|im_end|>Rome, the capital of Italy.<|im_end|>"
        # each assistant turn is a contiguous run that ends on <|im_end|>
        runs = np.split(ex.target_positions, np.where(np.diff(ex.target_positions) > 1)[0] + 1)
        assert len(runs) == 2 and all(ex.input_ids[r[-1]] == smol.eos_token_id for r in runs)
        context = np.delete(ex.input_ids, ex.target_positions)
        assert "Paris" not in smol.decode(context.tolist())
    pair = one(smol, {"prompt": "Where is Rome?", "response": "In Italy."})
    assert targets_text(smol, pair) == "In Italy.<|im_end|>"


def test_smollm2_real_text_and_truncation(smol):
    texts = wiki_texts(20)
    for text in texts:
        ex = one(smol, {"text": text}, max_length=64)
        assert_valid(ex, 64)
        assert ex.input_ids.tolist() == smol(text)["input_ids"][:64]
    long_answer = " ".join(texts[:3])
    ex = one(smol, {"messages": [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": long_answer}]}, max_length=100)
    assert len(ex.input_ids) == 100 and ex.target_positions[-1] == 99
    assert long_answer.startswith(targets_text(smol, ex))


def test_truncation_keeps_beginning_and_drops_late_targets(tok):
    row = {"prompt": "The quick brown fox", "response": " jumps over the lazy dog."}
    full = one(tok, row, chat_template_for_pairs=False)
    cut = len(full.input_ids) - 3
    ex = one(tok, row, max_length=cut, chat_template_for_pairs=False)
    assert ex.input_ids.tolist() == full.input_ids[:cut].tolist()
    assert ex.target_positions.tolist() == [t for t in full.target_positions.tolist() if t < cut]
    first = int(full.target_positions[0])
    message = bad(tok, row, max_length=first, chat_template_for_pairs=False)
    assert f"no supervised tokens within max_length={first}" in message


# ----------------------------------------------------------------------------- prompt-only (generate mode)


def test_prompt_only(tok):
    ex = one(tok, {"messages": CHAT}, prompt_only=True)
    assert ex.target_positions.shape == (0,) and ex.target_positions.dtype == np.int32
    rendered = tok.decode(ex.input_ids.tolist())
    assert rendered == tok.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("And of Italy?<|im_end|>\n<|im_start|>assistant\n")
    open_turn = one(tok, {"messages": CHAT[:4]}, prompt_only=True)  # ends with a user turn: keep it all
    assert open_turn.input_ids.tolist() == ex.input_ids.tolist()
    pair = one(tok, {"prompt": "Where is Rome?"}, prompt_only=True)  # no response needed
    assert tok.decode(pair.input_ids.tolist()) == "<|im_start|>user\nWhere is Rome?<|im_end|>\n<|im_start|>assistant\n"
    raw = one(tok, {"instruction": "Add.", "output": "3"}, prompt_only=True, chat_template_for_pairs=False)
    assert tok.decode(raw.input_ids.tolist()) == "Add.\n\n"
    message = bad(tok, {"text": "The quick brown fox jumps over the lazy dog."}, max_length=4, prompt_only=True)
    assert "leaving no room to generate within max_length=4" in message


# ----------------------------------------------------------------------------- bad rows


@pytest.mark.parametrize(
    "row, fmt, expected",
    [
        ({"prompt": "p"}, None, "field 'response' is missing (format 'prompt_response'"),
        ({"prompt": "p", "response": None}, None, "field 'response' is null"),
        ({"instruction": "i", "input": "x"}, None, "field 'output' is missing (format 'alpaca'"),
        ({"text": 5}, None, "field 'text' must be a string, got int"),
        ({"text": "  \n\t"}, None, "field 'text' is empty or whitespace-only"),
        ({"prompt": "p", "response": "   "}, None, "field 'response' is empty or whitespace-only"),
        ({"instruction": "", "output": "o"}, None, "field 'instruction' is empty"),
        ({"messages": "hello"}, None, "field 'messages' must be a list of {role, content} objects, got string"),
        ({"messages": []}, None, "field 'messages' is an empty list"),
        ({"messages": ["hi"]}, None, "messages[0] must be an object"),
        ({"messages": [{"content": "hi"}]}, None, "messages[0] has no string 'role'"),
        ({"messages": [{"role": "user", "content": ["a"]}]}, None, "messages[0] (user) needs a string 'content', got list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, None, "no assistant turn"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}, None, "messages[1] (assistant) has empty"),
        ({"text": "x"}, None, "no supervised tokens (nothing to learn"),
        ({"prompt": "p"}, "text", "field 'text' is missing (format 'text'"),
    ],
)
def test_bad_rows_name_the_problem(tok, row, fmt, expected):
    assert expected in bad(tok, row, fmt)


def test_bad_lines_in_files_name_path_and_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "The quick brown fox"}\n{"text": "a", oops}\n[1, 2]\n{"text": "\xff\xfe"}\n')
    rows = list(open_dataset(path).rows())
    assert [type(r).__name__ for _, _, r in rows] == ["dict", "BadRowError", "BadRowError", "BadRowError"]
    with pytest.raises(BadRowError) as info:
        list(tokenize_rows(rows, tok, 64))
    assert str(info.value).startswith(f"{path}:2: malformed JSON (") and "column 15" in str(info.value)
    reasons = [item.reason for item in tokenize_rows(rows, tok, 64, skip_bad_rows=True) if isinstance(item, SkippedRow)]
    assert reasons[1] == "expected a JSON object per line, got a JSON array"
    assert reasons[2] == "line is not valid UTF-8"


def test_template_errors_are_bad_rows(tok):
    strict = copy.deepcopy(tok)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tool turns are not supported') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    )
    rows = {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}
    assert "chat template rejected the conversation: tool turns are not supported" in bad(strict, rows)
    unstable = copy.deepcopy(tok)  # header depends on the conversation length: prefixes don't line up
    unstable.chat_template = (
        "{{ messages|length }} turns\n{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    assert "chat template is not prefix-stable" in bad(unstable, {"messages": CHAT})
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(KdcacheError, match="need a tokenizer with a chat template") as info:
        one(plain, {"messages": CHAT}, skip_bad_rows=True)
    assert not isinstance(info.value, BadRowError)
    raw = one(plain, {"prompt": "p", "response": "The fox"})  # pairs fall back to raw text
    assert targets_text(plain, raw) == "The fox<|im_end|>"


def test_skip_bad_rows_counts_and_keeps_seq_ids(tmp_path, tok):
    good = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(8)]
    broken = list(good)
    broken[1] = "{not json"
    broken[4] = {"prompt": "Question 4?", "response": ""}
    broken[6] = {"prompt": "Question 6?"}
    clean_path = write_jsonl(tmp_path / "clean.jsonl", good)
    broken_path = write_jsonl(tmp_path / "broken.jsonl", broken)
    clean = list(open_dataset(clean_path).examples(tok, 64))
    items = list(open_dataset(broken_path).examples(tok, 64, skip_bad_rows=True))
    assert [i.seq_id for i in items] == list(range(8))
    skipped = [i for i in items if isinstance(i, SkippedRow)]
    assert [(s.seq_id, s.source) for s in skipped] == [(1, f"{broken_path}:2"), (4, f"{broken_path}:5"), (6, f"{broken_path}:7")]
    assert "malformed JSON" in skipped[0].reason and "'response' is empty" in skipped[1].reason
    assert "'response' is missing" in skipped[2].reason
    kept = [i for i in items if isinstance(i, TokenizedExample)]
    for ex in kept:  # identical to the clean run at the same seq_id
        assert np.array_equal(ex.input_ids, clean[ex.seq_id].input_ids)
        assert np.array_equal(ex.target_positions, clean[ex.seq_id].target_positions)
    with pytest.raises(BadRowError, match=r"broken\.jsonl:2: malformed JSON"):
        list(open_dataset(broken_path).examples(tok, 64))


def test_describe(tmp_path):
    path = write_zst(tmp_path / "d.jsonl.zst", [{"messages": CHAT}])
    info = open_dataset(path).describe()
    assert info == {
        "source": str(path),
        "kind": "files",
        "format": "messages",
        "format_forced": False,
        "files": [str(path)],
    }


def test_a_row_that_already_begins_with_bos_gets_no_second_one(tok, caplog):
    """A tokenizer that adds a BOS, and text that already starts with it (an already-rendered
    chat pasted as text): one BOS, not supervised, and one warning for the run."""
    import copy

    from tokenizers import processors

    bos_tok = copy.deepcopy(tok)
    bos_tok.add_special_tokens({"bos_token": "<s>"})
    bos = bos_tok.bos_token_id
    bos_tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                                      special_tokens=[("<s>", bos)])
    plain = one(bos_tok, {"text": "The quick brown fox."})
    assert plain.input_ids[0] == bos and plain.input_ids[1] != bos
    rows = [(0, "mem:1", {"text": "<s>The quick brown fox."}), (1, "mem:2", {"text": "<s>Knowledge distillation."}),
            (2, "mem:3", {"prompt": "<s>Question?", "response": " Answer."})]
    with caplog.at_level("WARNING", logger="kdcache"):
        got = list(tokenize_rows(rows[:2], bos_tok, 64, fmt="text"))
        pair = list(tokenize_rows(rows[2:], bos_tok, 64, fmt="prompt_response", chat_template_for_pairs=False))[0]
    for ex in got + [pair]:
        assert ex.input_ids[0] == bos and (ex.input_ids[1:] != bos).all()
        assert 0 not in ex.target_positions
    np.testing.assert_array_equal(got[0].input_ids, plain.input_ids)
    warnings = [r.getMessage() for r in caplog.records if r.name == "kdcache"]
    assert len([w for w in warnings if "already begin with the tokenizer's BOS" in w]) == 2  # one per run
    assert "mem:1" in warnings[0]

"""Student/cache compatibility: tokenizers must agree on every id the cache can hold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kdcache.cache.manifest import load_manifest
from kdcache.errors import KdcacheError
from kdcache.student.compat import (
    check_output_rows,
    check_tokenizer,
    load_tokenizer,
    restricted_vocab_sha256,
)
from tests.conftest import CORPUS
from tests.test_train import config, make_cache, texts


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, tiny_llama) -> Path:
    return make_cache(tmp_path_factory.mktemp("compat") / "cache", tiny_llama, texts(12, 5), top_k=4)


def _other_tokenizer():
    from kdcache.testing.models import train_tokenizer

    other = ["Completely different words: zebra, xylophone, quartz, jukebox, fjord, sphinx."] * 30
    return train_tokenizer(other + CORPUS, 600)  # as many tokens as the teacher's, other ids


def test_teacher_tokenizer_hash_matches_manifest(tiny_llama, small_cache):
    manifest = load_manifest(small_cache)
    tok = load_tokenizer(tiny_llama)
    assert restricted_vocab_sha256(tok, len(tok)) == manifest["tokenizer"]["vocab_sha256"]
    assert check_tokenizer(tok, manifest, small_cache) == []


def test_extra_student_tokens_beyond_the_cache_vocab_are_fine(tiny_llama, small_cache):
    tok = load_tokenizer(tiny_llama)
    n = len(tok)
    tok.add_tokens(["<tool_call>", "<extra_1>"])
    assert len(tok) == n + 2
    assert check_tokenizer(tok, load_manifest(small_cache), small_cache) == []


def test_different_tokenizer_names_the_first_differing_token(small_cache):
    with pytest.raises(KdcacheError, match=r"first difference at id \d+: teacher '.*', student '.*'") as info:
        check_tokenizer(_other_tokenizer(), load_manifest(small_cache), small_cache, "other-student")
    assert "other-student" in str(info.value) and "\n" not in str(info.value)


def test_without_the_teacher_tokenizer_the_hashes_are_named(small_cache, tmp_path):
    cache = Path(shutil.copytree(small_cache, tmp_path / "moved"))
    shutil.rmtree(cache / "tokenizer")  # as if the cache came without the teacher's tokenizer
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["teacher"] = {**manifest["teacher"], **{k: "/nowhere/teacher" for k in ("model", "path", "spec")}}
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KdcacheError, match=r"vocabulary sha256 of ids < \d+ is [0-9a-f]{12}\.\.\., the cache's is"):
        check_tokenizer(_other_tokenizer(), load_manifest(cache), cache)
    # A shorter student tokenizer says so.
    from kdcache.testing.models import train_tokenizer

    small = train_tokenizer(CORPUS, 280)
    with pytest.raises(KdcacheError, match=r"the student has \d+ tokens, the cache uses ids up to \d+"):
        check_tokenizer(small, load_manifest(cache), cache)


def test_chat_template_difference_is_a_warning(tiny_llama, small_cache):
    tok = load_tokenizer(tiny_llama)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    warnings = check_tokenizer(tok, load_manifest(small_cache), small_cache)
    assert len(warnings) == 1 and "chat template differs" in warnings[0]


def test_output_layer_must_cover_the_vocab(small_cache):
    manifest = load_manifest(small_cache)
    n = manifest["tokenizer"]["vocab_size"]
    check_output_rows(n, manifest)
    check_output_rows(n + 64, manifest)  # padded rows (Qwen2.5-style) are fine
    with pytest.raises(KdcacheError, match="output layer has"):
        check_output_rows(n - 1, manifest)


def test_padded_vocab_student_trains(tiny_qwen_padded, small_cache, tmp_path):
    """A Qwen2 student whose output layer has 64 rows beyond its tokenizer."""
    from kdcache.student.train import train_student

    summary = train_student(config(tiny_qwen_padded, small_cache, tmp_path / "run", max_steps=2, final_model="last"))
    assert summary["steps"] == 2 and (tmp_path / "run" / "COMPLETE").exists()


def test_cli_refuses_a_mismatched_student_in_one_line(small_cache, tmp_path, capsys):
    from kdcache.cli import main
    from kdcache.testing.models import build_tiny_model

    other = build_tiny_model(tmp_path / "other", ["zebra xylophone quartz"] * 40 + CORPUS[:3], vocab_size=300)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["train-student", "--student", str(other), "--cache", str(small_cache), "--output", str(out),
              "--device", "cpu", "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kdcache: error: ") and "does not match the tokenizer of cache" in err[-1]
    assert not out.exists()  # refused before anything was written
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(other), "--cache", str(small_cache), "--device", "cpu"])
    assert "does not match the tokenizer" in capsys.readouterr().err


def test_tokenizer_saved_in_the_cache_names_the_first_difference_offline(small_cache, tmp_path):
    """A cache copied to a machine without the teacher still names the first differing token."""
    cache = Path(shutil.copytree(small_cache, tmp_path / "copied"))
    assert (cache / "tokenizer" / "tokenizer.json").exists()
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["teacher"] = {**manifest["teacher"], **{k: "/nowhere/teacher" for k in ("model", "path", "spec")}}
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KdcacheError, match=r"first difference at id \d+: teacher '.*', student '.*'"):
        check_tokenizer(_other_tokenizer(), load_manifest(cache), cache)


def test_eval_refuses_a_loss_the_cache_cannot_feed(small_cache, tiny_llama, capsys):
    """An explicit --loss is checked as train-student checks it, instead of being dropped."""
    from kdcache.cli import main

    for args, message in ((["--loss", "tail_rs"], "tail_rs needs tokens drawn from outside the top-k"),
                          (["--loss", "rs_kd"], "rs_kd needs tokens drawn from the teacher's full distribution"),
                          (["--max-sequences", "0"], "--max-sequences must be >= 1")):
        with pytest.raises(SystemExit) as info:
            main(["eval", "--model", str(tiny_llama), "--cache", str(small_cache), "--device", "cpu", *args])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]

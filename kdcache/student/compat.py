"""Can this student learn from this cache? Tokenizer and vocabulary checks.

The cache stores token *ids* of the teacher's tokenizer. A student is compatible when its
tokenizer maps every id the cache can hold (``id < manifest.tokenizer.vocab_size``) to the
same token string, and its output layer has at least that many rows (extra rows, as in
checkpoints whose embedding matrix is padded, are fine: they join the softmax as outcomes
the teacher never chose).

The manifest keeps only a hash of the teacher's vocabulary (see
``kdcache.teacher.loading.tokenizer_fingerprint``), so the check hashes the student's
mapping restricted to those ids in the same way. To name the first differing token, the
teacher's tokenizer is loaded from ``<cache>/tokenizer/`` or the teacher path recorded in
the manifest, when either is available.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from kdcache.cache.manifest import sampling_mode
from kdcache.errors import KdcacheError, first_line

logger = logging.getLogger("kdcache")


def restricted_vocab_sha256(tokenizer: Any, vocab_size: int) -> str:
    """sha256 of the token->id mapping for ids ``< vocab_size``, serialized exactly like
    ``tokenizer_fingerprint`` (so a student with the teacher's tokenizer gives the
    manifest's ``vocab_sha256``, and one with extra tokens at the end does too)."""
    items = [(tok, i) for tok, i in tokenizer.get_vocab().items() if i < vocab_size]
    canonical = json.dumps(sorted(items, key=lambda kv: (kv[1], kv[0])), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def chat_template_sha256(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode("utf-8")).hexdigest() if template else None


def load_tokenizer(model: str | Path):
    """The tokenizer of a model directory / hub id (one-line error if it cannot be loaded)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model))
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        raise KdcacheError(f"{model}: cannot load the student's tokenizer ({first_line(exc)})") from None


def _teacher_tokenizer(cache_dir: str | Path, manifest: dict):
    """The teacher's tokenizer if reachable offline and matching the manifest hash, else None.

    Looks in ``<cache>/tokenizer`` (downloaded to a temporary directory when the cache is on
    an object store), then at the teacher path recorded in the manifest."""
    import tempfile

    from kdcache.cache.storage import open_store

    teacher = manifest.get("teacher", {})
    local = [Path(str(teacher[k])) for k in ("path", "model", "spec") if teacher.get(k)]
    store = open_store(cache_dir)
    if store.is_local:
        return _first_matching([store.path("tokenizer"), *local], manifest)
    with tempfile.TemporaryDirectory(prefix="kdcache-tokenizer-") as tmp:
        try:
            if store.exists("tokenizer/tokenizer_config.json"):  # uploaded last: the copy is complete
                for name in store.list("tokenizer"):
                    (Path(tmp) / name).write_bytes(bytes(store.read_bytes(f"tokenizer/{name}")))
        except (OSError, KdcacheError):
            pass  # unreadable: try the teacher path
        return _first_matching([Path(tmp), *local], manifest)


def _first_matching(candidates: list[Path], manifest: dict):
    from transformers import AutoTokenizer

    want = manifest["tokenizer"]
    for path in candidates:
        if not (path.is_dir() and (path / "tokenizer_config.json").exists()):
            continue
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception:  # noqa: BLE001 - unreadable: try the next candidate
            continue
        if restricted_vocab_sha256(tok, want["vocab_size"]) == want["vocab_sha256"]:
            return tok
    return None


def first_difference(teacher_tok: Any, student_tok: Any, vocab_size: int) -> tuple[int, str | None, str | None] | None:
    """``(id, teacher token, student token)`` of the lowest id ``< vocab_size`` that differs."""
    t_inv = {i: t for t, i in teacher_tok.get_vocab().items() if i < vocab_size}
    s_inv = {i: t for t, i in student_tok.get_vocab().items() if i < vocab_size}
    for i in range(vocab_size):
        if t_inv.get(i) != s_inv.get(i):
            return i, t_inv.get(i), s_inv.get(i)
    return None


def check_tokenizer(student_tok: Any, manifest: dict, cache_dir: str | Path, student_name: str = "student") -> list[str]:
    """Raise :class:`KdcacheError` if the student cannot read the cache's token ids.

    Returns warnings (chat template or special tokens that differ: harmless for the loss,
    but the trained model will expect the teacher's chat format).
    """
    from kdcache.cache.storage import is_url

    cache_dir = cache_dir if is_url(cache_dir) else Path(cache_dir)
    want = manifest["tokenizer"]
    vocab_size = int(want["vocab_size"])
    if restricted_vocab_sha256(student_tok, vocab_size) != want["vocab_sha256"]:
        where = f"{student_name}'s tokenizer does not match the tokenizer of cache {cache_dir}"
        teacher_tok = _teacher_tokenizer(cache_dir, manifest)
        if teacher_tok is not None:
            diff = first_difference(teacher_tok, student_tok, vocab_size)
            if diff is not None:
                i, t, s = diff
                raise KdcacheError(
                    f"{where}: first difference at id {i}: teacher {t!r}, student {s!r} "
                    "(distill only into a student with the teacher's tokenizer)"
                )
        if len(student_tok) < vocab_size:
            raise KdcacheError(
                f"{where}: the student has {len(student_tok)} tokens, the cache uses ids up to {vocab_size - 1} "
                "(distill only into a student with the teacher's tokenizer)"
            )
        student_hash = restricted_vocab_sha256(student_tok, vocab_size)
        raise KdcacheError(
            f"{where}: vocabulary sha256 of ids < {vocab_size} is {student_hash[:12]}..., the cache's is "
            f"{want['vocab_sha256'][:12]}... (teacher tokenizer not available to name the first differing token; "
            "distill only into a student with the teacher's tokenizer)"
        )
    warnings = []
    if chat_template_sha256(student_tok) != want.get("chat_template_sha256"):
        warnings.append(
            f"{student_name}'s chat template differs from the teacher's that rendered cache {cache_dir}; "
            "the trained student will expect the teacher's chat format"
        )
    special = {k: str(v) for k, v in (want.get("special_tokens") or {}).items()}
    mine = {k: str(getattr(student_tok, k)) for k in special if getattr(student_tok, k, None) is not None}
    differing = sorted(k for k in special if mine.get(k) != special[k])
    if differing:
        warnings.append(
            f"{student_name}'s special tokens differ from the teacher's ({', '.join(differing)}): "
            + ", ".join(f"{k} {mine.get(k)!r} vs {special[k]!r}" for k in differing)
        )
    return warnings


def check_output_rows(num_rows: int, manifest: dict, student_name: str = "student") -> None:
    """The student's output layer must have a row for every id the cache can hold."""
    vocab_size = int(manifest["tokenizer"]["vocab_size"])
    if num_rows < vocab_size:
        raise KdcacheError(
            f"{student_name}'s output layer has {num_rows} rows but the cache holds token ids up to {vocab_size - 1}"
        )


def check_same_tokenizer(train_manifest: dict, eval_manifest: dict, eval_dir: str | Path, what: str = "eval cache") -> None:
    """An eval (or ``--mix-cache``) cache must come from the same tokenizer as the training cache."""
    a, b = train_manifest["tokenizer"], eval_manifest["tokenizer"]
    if (a["vocab_size"], a["vocab_sha256"]) != (b["vocab_size"], b["vocab_sha256"]):
        raise KdcacheError(f"{eval_dir}: {what} was made with another tokenizer than the training cache (--cache)")


def check_rollout_caches(training: list[tuple[str | Path | None, Any]], evaluation: list[tuple[str | Path | None, Any]],
                         student: str, allow_mixed_rounds: bool) -> list[str]:
    """Refuse caches of samples from different rollout rounds or students in one run (unless
    ``allow_mixed_rounds``), and warn when the student being trained is not the one that
    sampled a rollout cache (its on-policy losses then weigh off-policy samples).

    Args:
        training, evaluation: ``(directory, CacheReader or None)`` of the caches the run trains
            on and of those it evaluates on.
        student: ``--student`` (a local directory is hashed like ``kdcache rollout`` hashes it;
            a hub id is not checked).
        allow_mixed_rounds: ``--allow-mixed-rounds``.

    Returns the warnings.
    """
    from kdcache.rollout.provenance import cache_rollout, check_rollout_rounds, rollout_student_warning, weights_sha256

    check_rollout_rounds([(path, reader.manifest) for path, reader in training + evaluation if reader is not None],
                         allow_mixed_rounds=allow_mixed_rounds)
    rollouts = [(path, reader.manifest) for path, reader in training
                if reader is not None and cache_rollout(reader.manifest) is not None]
    student_dir = Path(student)
    if not rollouts or not student_dir.is_dir():
        return []
    try:
        sha = weights_sha256(student_dir)
    except KdcacheError:
        return []  # no weight files to compare (load_student names what is wrong)
    return [w for path, manifest in rollouts if (w := rollout_student_warning(manifest, path, sha)) is not None]


def resolve_loss(loss: str, manifest: dict) -> str:
    """``--loss auto``: ``rs_kd`` for a cache of samples only, ``tail_rs`` for a cache of
    top-k plus tail samples, else ``tail`` (top-k + tail bucket); any other name is
    returned unchanged."""
    if loss != "auto":
        return loss
    if sampling_mode(manifest) == "tail":
        return "tail_rs"
    samples_only = int(manifest["top_k"]) <= 0 and int(manifest["sampling"]["num_samples"]) > 0
    return "rs_kd" if samples_only else "tail"


def ignored_draws_warning(loss: str, manifest: dict, cache_dir: str | Path) -> str | None:
    """A warning when ``loss`` leaves a cache's draws unused (it then sees only the top-k and the tail bucket)."""
    from kdcache.student.losses import POLICY_GRADIENT_LOSSES

    mode, k = sampling_mode(manifest), manifest["top_k"]
    if loss in POLICY_GRADIENT_LOSSES:
        if mode == "none":
            return None
        return (f"{cache_dir} holds teacher draws per token; --loss {loss} reads only the teacher's log-prob of each "
                "sampled token, so the draws go unused (scoring the rollout with --top-k 1 --sampling none is enough)")
    if mode == "tail" and loss != "tail_rs":
        return (f"{cache_dir} holds top-{k} plus draws from outside it; --loss {loss} ignores the draws "
                f"and sees only the top-{k} and one tail bucket (--loss tail_rs uses them; for {loss} "
                "make the cache with --top-k 64 --sampling none)")
    if mode == "random" and int(k) > 0 and loss != "rs_kd":
        return (f"{cache_dir} holds top-{k} plus {manifest['sampling']['num_samples']} draws from the full distribution; "
                f"--loss {loss} ignores the draws (--loss rs_kd trains on them instead of the top-{k})")
    return None


def check_loss_needs(loss: str, manifest: dict, cache_dir: str | Path, flag: str = "--loss") -> None:
    """The loss must find what it needs in the cache: top-k, full-distribution samples for
    ``rs_kd``, top-k plus tail samples for ``tail_rs``, a rollout's log-probs for ``sampled_rkl``."""
    from kdcache.rollout.provenance import cache_rollout
    from kdcache.student.losses import POLICY_GRADIENT_LOSSES

    if loss in POLICY_GRADIENT_LOSSES:
        if cache_rollout(manifest) is None:
            raise KdcacheError(
                f"{cache_dir}: {flag} {loss} trains on the student's own samples, but this cache scored fixed data "
                "(no rollout log-probs); make it from a `kdcache rollout` directory (generate-teacher --dataset "
                "ROLLOUT), or use a divergence such as --loss tail on this cache"
            )
        return
    mode = sampling_mode(manifest)
    if loss == "rs_kd" and mode != "random":
        got = "tokens drawn from outside the top-k only (--sampling tail; use --loss tail_rs)" if mode == "tail" else "none"
        raise KdcacheError(
            f"{cache_dir}: {flag} rs_kd needs tokens drawn from the teacher's full distribution, but this cache has "
            f"{got} (regenerate it with `generate-teacher --sampling random`)"
        )
    if loss == "tail_rs" and mode != "tail":
        raise KdcacheError(
            f"{cache_dir}: {flag} tail_rs needs tokens drawn from outside the top-k, but this cache has "
            f"{'full-distribution samples' if mode == 'random' else 'no samples'} "
            "(regenerate it with `generate-teacher --sampling tail`, or use --loss tail)"
        )
    if loss != "rs_kd" and int(manifest["top_k"]) <= 0:
        raise KdcacheError(
            f"{cache_dir}: {flag} {loss} needs the teacher's top-k, but this cache stores samples only (top_k 0); "
            "use --loss rs_kd"
        )

"""Where a cache's bytes go, and how far each top-k column is from its order-0 entropy.

    python benchmarks/bench_storage.py CACHE_DIR [--json]

Prints bytes per supervised token per Parquet column (compressed, from the footers), bytes
per top-k entry, and the order-0 Shannon entropy of the symbols the top-k columns encode
(the 16/24-bit id codes and the log-prob gaps, each as one symbol), computed per shard with
the shard's own symbol frequencies. A coder that sees each symbol on its own (Huffman, zstd's
literals, an order-0 arithmetic coder) cannot go below that floor; getting lower needs a
model that conditions on context (rank, neighbouring positions, the text). The same entropy
conditioned on the rank within the top-k list is printed too: a plug-in estimate, biased low
(the (id, rank) alphabet is large next to the sample), so an optimistic bound for a
rank-aware coder.

Last, a held-out test of conditioning the ids on the text: each id is coded with a mix of
its frequency in a context (the previous input token, or the actual next token, which a
reader knows from ``input_ids``) and its overall frequency, both counted on the first half
of the cache's positions and scored on the second half (the mixing weight is the best of
a small grid, so the estimate is optimistic). Its saving over the same model without
context is what such a coder, short of a language model inside it, can buy.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
from pathlib import Path

import numpy as np


def entropy_bytes(symbols: np.ndarray) -> float:
    """Total order-0 entropy of ``symbols`` in bytes (sum over symbols of -log2 p / 8)."""
    if symbols.size == 0:
        return 0.0
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum() / 8)


def _mixed_bits(context, ids, half, vocab, unigram, weights) -> tuple[float, float]:
    """Best (bits per id, weight) on positions ``half:`` of ``w * p(id | context) + (1 - w) * unigram``."""
    k = ids.shape[1]
    keys, key_counts = np.unique((context[:half, None] * vocab + ids[:half]).ravel(), return_counts=True)
    context_n = np.bincount(context[:half], minlength=vocab) * k
    test_context = np.broadcast_to(context[half:, None], ids[half:].shape).ravel()
    test_keys = test_context * vocab + ids[half:].ravel()
    at = np.searchsorted(keys, test_keys).clip(max=keys.shape[0] - 1)
    hits = np.where(keys[at] == test_keys, key_counts[at], 0)
    seen = context_n[test_context]
    p_context = hits / np.maximum(seen, 1)
    p_unigram = unigram[ids[half:].ravel()]
    bits = {w: float(-np.log2(np.where(seen > 0, w * p_context + (1 - w) * p_unigram, p_unigram)).mean()) for w in weights}
    best = min(bits, key=bits.get)
    return bits[best], best


def heldout_id_bits(reader, weights=(0.3, 0.5, 0.7)) -> dict:
    """Bits per top-k id on the second half of the positions, for models fit on the first half.

    ``unigram``: add-1/2 frequencies over the vocabulary. ``given_previous_token`` and
    ``given_next_token``: the best mix ``w * p(id | t) + (1 - w) * unigram`` over ``weights``,
    where ``p(id | t)`` is the share of ``id`` among the top-k entries of the positions whose
    previous input token (or actual next token, which readers know from ``input_ids``) is ``t``.
    """
    ids, prev, nxt = [], [], []
    for seq in reader.iter_sequences():
        if seq.num_targets:
            tokens, positions = np.asarray(seq.input_ids), np.asarray(seq.target_positions)
            ids.append(seq.topk_ids)
            prev.append(tokens[positions - 1])
            nxt.append(tokens[positions])
    ids = np.concatenate(ids).astype(np.int64)
    half = ids.shape[0] // 2
    contexts = {"previous_token": np.concatenate(prev).astype(np.int64), "next_token": np.concatenate(nxt).astype(np.int64)}
    vocab = int(max(ids.max(), *(c.max() for c in contexts.values()))) + 1
    unigram = np.bincount(ids[:half].ravel(), minlength=vocab) + 0.5
    unigram /= unigram.sum()
    result = {"train_positions": half, "unigram_bits_per_id": round(float(-np.log2(unigram[ids[half:]]).mean()), 3)}
    for name, context in contexts.items():
        bits, weight = _mixed_bits(context, ids, half, vocab, unigram, weights)
        result[f"given_{name}_bits_per_id"] = round(bits, 3)
        result[f"given_{name}_weight"] = weight
    return result


def analyze(cache_dir: Path) -> dict:
    import pyarrow
    import pyarrow.parquet as pq

    from kdcache.cache.reader import CacheReader, _planes

    reader = CacheReader(cache_dir)
    k = reader.top_k
    column_bytes: collections.Counter = collections.Counter()
    footer_bytes = file_bytes = 0
    floor_codes = floor_gaps = rank_codes = rank_gaps = 0.0
    tokens = 0
    for shard in reader.shards:
        path = reader.shard_path(shard)
        pf = pq.ParquetFile(path)
        meta = pf.metadata
        for rg in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(rg).column(c)
                column_bytes[col.path_in_schema.split(".")[0]] += col.total_compressed_size
        footer_bytes += meta.serialized_size
        file_bytes += path.stat().st_size
        tokens += shard["supervised_tokens"]
        if k:
            table = pf.read(columns=["topk_code_b0", "topk_code_b1", "topk_code_b2", "topk_lpq_b0", "topk_lpq_b1"])
            batches = table.to_batches()
            codes = np.concatenate([_planes(b, ("topk_code_b0", "topk_code_b1", "topk_code_b2")) for b in batches]).astype(np.int64)
            gaps = np.concatenate([_planes(b, ("topk_lpq_b0", "topk_lpq_b1")) for b in batches]).astype(np.int64)
            floor_codes += entropy_bytes(codes)
            floor_gaps += entropy_bytes(gaps)
            rank = np.tile(np.arange(k, dtype=np.int64), codes.shape[0] // k)
            rank_bytes = codes.shape[0] * np.log2(k) / 8  # H(rank): uniform over 0..k-1
            rank_codes += entropy_bytes(codes * k + rank) - rank_bytes
            rank_gaps += entropy_bytes(gaps * k + rank) - rank_bytes
    entries = tokens * k
    per_token = {name: round(b / tokens, 3) for name, b in sorted(column_bytes.items())}
    result = {
        "cache": str(cache_dir),
        "supervised_tokens": tokens,
        "top_k": k,
        "num_samples": reader.num_samples,
        "bytes_per_token": round(file_bytes / tokens, 3),
        "footer_bytes_per_token": round(footer_bytes / tokens, 3),
        "column_bytes_per_token": per_token,
        "machine": platform.processor() or platform.machine(),
        "pyarrow": pyarrow.__version__,
    }
    if k:
        topk_cols = ("topk_code_b0", "topk_code_b1", "topk_code_b2", "topk_lpq_b0", "topk_lpq_b1")
        stored = sum(column_bytes[c] for c in topk_cols)
        result.update({
            "bytes_per_entry_all_columns": round(file_bytes / entries, 3),
            "bytes_per_entry_topk_columns": round(stored / entries, 3),
            "order0_floor_bytes_per_entry": round((floor_codes + floor_gaps) / entries, 3),
            "order0_floor_id_codes": round(floor_codes / entries, 3),
            "order0_floor_logprob_gaps": round(floor_gaps / entries, 3),
            "given_rank_floor_bytes_per_entry": round((rank_codes + rank_gaps) / entries, 3),
            "given_rank_floor_logprob_gaps": round(rank_gaps / entries, 3),
            "heldout_id_models": heldout_id_bits(reader),
        })
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = analyze(args.cache)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        if key == "column_bytes_per_token":
            for name, b in value.items():
                print(f"  {name:24s} {b:9.3f} B/token")
        else:
            print(f"{key:32s} {value}")


if __name__ == "__main__":
    main()

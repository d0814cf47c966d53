"""Stage two from object storage vs local disk: train-student's step rate on the same cache.

Builds a cache of real Wikipedia text scored by a small random-init Llama (transformers,
float32), copies it into a bucket of moto's S3 server (started here as its own process on
127.0.0.1, so its request handling does not share this process's interpreter), and runs
``train_student`` on ``--cache DIR`` and on ``--cache s3://...`` in alternating order, several
rounds. The rate is optimizer steps per second inside train-student's loop, from the
``elapsed_s`` of its ``metrics.jsonl`` (data loading, decoding, packing, forward, backward and
the optimizer step; model loading and the final export are outside): steps 2..N, so both arms
skip the first shard's read, and over all N steps. The headline is the median over rounds of
each round's S3 / local ratio (the two runs of a round are adjacent in time, so load from
other processes on a shared machine cancels best there); medians of the rates are printed too.

``--no-read-ahead`` adds a third arm that reads from S3 without fetching the next shard in the
background (the reader's ``read_ahead=0``), to show what read-ahead buys.

Second figure, the worst case: the data path alone (train-student's ``GlobalBatches`` and
packing into micro-batches, no model), one epoch per round, batches/s from each location.
With no step to hide behind, read-ahead can only overlap a shard's fetch with decoding and
packing the previous one.

The student is the teacher itself (same tokenizer), trained on one torch thread (as a GPU
step leaves the host's other cores to the data path; on a shared 2-core machine it also keeps
OpenMP's spinning threads from turning a busy core into seconds-long steps). moto serves
objects from Python on the same machine, much slower than S3 (on the 2-core EPYC: 17 ms for
a 30 kB GET, about 8 MB/s for large objects), and its CPU time comes out of the same cores
as the training step; the script reports that CPU time per S3 run. A harder test than a real
bucket.

The defaults give 32 steps per shard (``--shard-size 128``, ``--batch 4``), the ratio of
generate-teacher's and train-student's defaults (1024-row shards, 32-sequence batches);
``--shard-size 32`` reads a new shard 4x as often.

    python benchmarks/bench_storage_read.py                       # default cache mode: top-4 + 8 tail draws
    python benchmarks/bench_storage_read.py --top-k 64 --sampling none
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=1).read()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _steps_per_s(run_dir: Path) -> tuple[float, float]:
    """(steps 2..N per second, all N steps per second) from train-student's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in records if r.get("type") == "train"]
    return (len(elapsed) - 1) / (elapsed[-1] - elapsed[0]), len(elapsed) / elapsed[-1]


def _loader_batches_per_s(location: str, batch: int, seed: int, read_ahead: int) -> float:
    """One epoch of train-student's data path (shard read, decode, shuffle, packing) without a model."""
    from kdcache.cache.reader import CacheReader
    from kdcache.student.data import GlobalBatches, micro_batches

    reader = CacheReader(location, read_ahead=read_ahead)
    batches = GlobalBatches(reader, batch, seed)
    count, start = 0, time.perf_counter()
    while batches.position.epoch == 0:
        seqs, _ = next(batches)
        micro_batches(seqs, 2048, reader.top_k, reader.num_samples, with_samples=reader.sampling_mode != "none")
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=128, help="rows per shard (a new shard every shard-size / "
                        "batch steps)")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--sampling", default="tail")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2048, help="size of the BPE tokenizer trained on the texts")
    parser.add_argument("--batch", type=int, default=4, help="--global-batch-size (sequences per step)")
    parser.add_argument("--steps", type=int, default=48, help="--max-steps per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--no-read-ahead", action="store_true", help="add an S3 arm without read-ahead")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = parser.parse_args()

    import numpy as np
    import pyarrow
    import torch
    import transformers
    from pyarrow import fs as pafs

    from kdcache.cache import reader as reader_module
    from kdcache.cache.stats import summarize
    from kdcache.demo import wiki_entries
    from kdcache.student.train import TrainConfig, train_student
    from kdcache.teacher.generate import GenerateConfig, generate_teacher_cache
    from kdcache.testing.models import build_tiny_model

    torch.set_num_threads(args.torch_threads)
    texts = [entry["extract"] for entry in wiki_entries()[: args.texts]]
    work = Path(tempfile.mkdtemp(prefix="kdcache-storage-read-"))
    server, endpoint = _start_moto()
    try:
        model = build_tiny_model(work / "model", texts, vocab_size=args.vocab, hidden_size=args.hidden,
                                 num_layers=args.layers)
        data = work / "wiki.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        local = work / "cache"
        generate_teacher_cache(GenerateConfig(
            teacher=str(model), dataset=str(data), output=str(local), backend="hf", dtype="float32",
            top_k=args.top_k, sampling=args.sampling, samples=args.samples, max_length=args.max_length,
            shard_size=args.shard_size, progress=False,
        ))
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_ENDPOINT_URL=endpoint,
                          AWS_DEFAULT_REGION="us-east-1")
        s3 = pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True)
        s3.create_dir("bench")
        pafs.copy_files(str(local), "bench/cache", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
        url = "s3://bench/cache"
        summary = summarize(local)

        arms = {"local": str(local), "s3": url}
        if args.no_read_ahead:
            arms["s3_no_read_ahead"] = url
        init = reader_module.CacheReader.__init__
        rates: dict[str, list[float]] = {arm: [] for arm in arms}
        whole: dict[str, list[float]] = {arm: [] for arm in arms}
        server_cpu: list[float] = []  # moto's CPU seconds per S3 run (with read-ahead)
        loop_seconds: list[float] = []
        for round_index in range(args.rounds):
            order = list(arms) if round_index % 2 == 0 else list(reversed(arms))
            for arm in order:
                ahead = 0 if arm == "s3_no_read_ahead" else 1
                reader_module.CacheReader.__init__ = lambda self, path, read_ahead=ahead: init(self, path, read_ahead)
                run = work / f"run-{arm}-{round_index}"
                cpu_before = _cpu_seconds(server.pid)
                train_student(TrainConfig(
                    student=str(model), cache=arms[arm], output=str(run), device="cpu", dtype="float32",
                    global_batch_size=args.batch, micro_batch_tokens=max(2048, args.max_length), max_steps=args.steps,
                    lr=1e-4, warmup_ratio=0.0, progress=False, save_every=0, final_model="last", seed=round_index,
                ))
                reader_module.CacheReader.__init__ = init
                steady, overall = _steps_per_s(run)
                if arm == "s3":
                    server_cpu.append(_cpu_seconds(server.pid) - cpu_before)
                    loop_seconds.append(args.steps / overall)
                rates[arm].append(steady)
                whole[arm].append(overall)
                print(f"round {round_index} {arm:>17}: {steady:.2f} steps/s (steps 2..{args.steps}), "
                      f"{overall:.2f} over all steps", file=sys.stderr)
        loader: dict[str, list[float]] = {arm: [] for arm in arms}
        for round_index in range(args.rounds):
            for arm in list(arms) if round_index % 2 == 0 else list(reversed(arms)):
                rate = _loader_batches_per_s(arms[arm], args.batch, round_index, 0 if arm == "s3_no_read_ahead" else 1)
                loader[arm].append(rate)
                print(f"round {round_index} {arm:>17}: data path alone {rate:.1f} batches/s", file=sys.stderr)
        paired = [s3_rate / local_rate for s3_rate, local_rate in zip(rates["s3"], rates["local"])]
        paired_loader = [s3_rate / local_rate for s3_rate, local_rate in zip(loader["s3"], loader["local"])]
        median = {arm: statistics.median(values) for arm, values in rates.items()}
        median_loader = {arm: statistics.median(values) for arm, values in loader.items()}
        median_whole = {arm: statistics.median(values) for arm, values in whole.items()}
        import moto

        result = {
            "benchmark": "train-student steps/s reading the same cache from moto's S3 server vs local disk",
            "cache": {"top_k": args.top_k, "sampling": args.sampling, "samples": args.samples,
                      "shard_rows": args.shard_size, "shards": summary["shards"], "sequences": summary["sequences"],
                      "supervised_tokens": summary["supervised_tokens"], "bytes": summary["bytes"]},
            "student": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
            "steps_per_run": args.steps, "batch": args.batch, "rounds": args.rounds,
            "steps_per_s_median": {arm: round(v, 3) for arm, v in median.items()},
            "steps_per_s_median_all_steps": {arm: round(v, 3) for arm, v in median_whole.items()},
            "steps_per_s_rounds": {arm: [round(v, 3) for v in values] for arm, values in rates.items()},
            "ratio_s3_over_local_median_of_rounds": round(statistics.median(paired), 3),
            "ratio_s3_over_local_rounds": [round(v, 3) for v in paired],
            "ratio_s3_over_local": round(median["s3"] / median["local"], 3),
            "ratio_s3_over_local_all_steps": round(median_whole["s3"] / median_whole["local"], 3),
            "s3_server_cpu_s_per_run_median": round(statistics.median(server_cpu), 2),
            "s3_run_loop_s_median": round(statistics.median(loop_seconds), 2),
            "data_path_alone_batches_per_s_median": {arm: round(v, 1) for arm, v in median_loader.items()},
            "data_path_alone_rounds": {arm: [round(v, 1) for v in values] for arm, values in loader.items()},
            "data_path_alone_ratio_s3_over_local": round(median_loader["s3"] / median_loader["local"], 3),
            "data_path_alone_ratio_median_of_rounds": round(statistics.median(paired_loader), 3),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "pyarrow": pyarrow.__version__,
            "numpy": np.__version__, "moto": moto.__version__,
        }
        if args.no_read_ahead:
            result["ratio_s3_no_read_ahead_over_local"] = round(median["s3_no_read_ahead"] / median["local"], 3)
            result["ratio_s3_no_read_ahead_over_local_median_of_rounds"] = round(statistics.median(
                [a / b for a, b in zip(rates["s3_no_read_ahead"], rates["local"])]), 3)
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
    finally:
        server.terminate()
        server.wait()
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

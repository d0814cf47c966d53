"""Pipeline YAML files: one file, a `teacher:` section for stage one and a `student:` section
for stage two, so the same file drives the inference and the training machine; on-policy
pipelines add a `rollout:` section (``kdcache rollout``) and an `onpolicy:` section
(``kdcache onpolicy``, :mod:`kdcache.onpolicy`).

Keys are the long option names of the command (``top_k`` or ``top-k``); flags given on the
command line win over the file.
"""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from kdcache.errors import KdcacheError

SECTIONS = {"generate-teacher": "teacher", "train-student": "student", "eval": "student", "rollout": "rollout"}
#: Top-level keys a pipeline file may hold.
TOP_LEVEL = ("teacher", "student", "rollout", "onpolicy", "name", "description")


def load_section(path: str | Path, section: str) -> dict:
    """The ``section`` mapping of a pipeline YAML file (``{}`` if the section is absent)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise KdcacheError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise KdcacheError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise KdcacheError(f"{path}: expected a mapping with 'teacher:' and/or 'student:' sections")
    unknown = set(data) - set(TOP_LEVEL)
    if unknown:
        raise KdcacheError(f"{path}: unknown top-level keys {sorted(unknown)} (allowed: {', '.join(TOP_LEVEL)})")
    body = data.get(section) or {}
    if not isinstance(body, dict):
        raise KdcacheError(f"{path}: section '{section}' must be a mapping")
    return {str(k).replace("-", "_"): v for k, v in body.items()}


def command_section(config_path: str | Path, command: click.Command) -> dict:
    """The section of ``command`` (:data:`SECTIONS`) keyed by the command's parameter names.

    Raises:
        KdcacheError: a key the command does not take (one line naming the section and keys).
    """
    values = load_section(config_path, SECTIONS[command.name])
    params = {p.name: p for p in command.params if isinstance(p, click.Option)}
    # A key may be the option's long name (`format`) or its Python name (`data_format`).
    by_flag = {flag.lstrip("-").replace("-", "_"): p.name for p in params.values() for flag in p.opts if flag.startswith("--")}
    values = {by_flag.get(k, k): v for k, v in values.items()}
    unknown = sorted(k for k in values if k not in params or k == "config")
    if unknown:
        raise KdcacheError(
            f"{config_path}: section '{SECTIONS[command.name]}' has options that `kdcache {command.name}` "
            f"does not take: {', '.join(unknown)}"
        )
    return values


def apply_config(ctx: click.Context, command: click.Command, config_path: str | None) -> None:
    """Fill ``ctx.default_map`` from the config section so explicit flags still override it."""
    if not config_path:
        return
    ctx.default_map = {**(ctx.default_map or {}), **command_section(config_path, command)}


def changed_keys(old: dict, new: dict) -> list[str]:
    """Sorted top-level keys whose values differ between two settings dicts."""
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]

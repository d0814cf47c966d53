"""What the CLI prints: kdcache's own progress, summaries, warnings and errors, and nothing
from the libraries underneath unless ``--verbose`` (or ``KDCACHE_VERBOSE=1``) asks for it.

The settings are environment variables and warning filters made before vLLM, transformers or
torch are imported, so vLLM's engine processes (which inherit the environment) stay quiet too.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import click

VERBOSE_ENV = "KDCACHE_VERBOSE"

#: Environment for quiet runs; a value the user set already wins.
_QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",        # engine config dumps, NUMA/Triton/platform notices
    "VLLM_CONFIGURE_LOGGING": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # weight-loading bars; kdcache draws its own
    "TOKENIZERS_PARALLELISM": "false",    # the fork warning when vLLM starts its engine
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "TORCH_LOGS": "-torch",               # torch's own warnings (e.g. "Triton not available") in engine processes
}


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def configure(verbose: bool | None = None) -> None:
    """Quiet the libraries (the default) or leave everything they print (``verbose``)."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    if is_verbose():
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in ("vllm", "transformers", "torch", "datasets", "huggingface_hub", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _set_verbose(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        configure(True)
    return value


def verbose_option(func):
    """``--verbose``: also show what vLLM, transformers and torch print (engine logs, warnings)."""
    return click.option("--verbose", is_flag=True, expose_value=False, is_eager=True, callback=_set_verbose,
                        help="Also show what vLLM, transformers and torch print (engine logs, library warnings).")(func)

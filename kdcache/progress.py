"""The progress bar of kdcache's long jobs (stage one, rollouts): rows done, with tokens/s."""

from __future__ import annotations

import sys
import time


class RowProgress:
    """tqdm over rows (ETA by rows) with tokens/s in the postfix.

    Create it once the model has loaded, so that neither the rate nor the ETA counts the load.
    ``finished(n)`` moves the bar as an engine finishes rows inside one call; ``update(rows,
    tokens)`` adds rows and tokens when results come back.
    """

    def __init__(self, total: int, enabled: bool, unit: str = "row", label: str | None = None) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit=unit, disable=not enabled, dynamic_ncols=True, file=sys.stderr, desc=label)
        self.tokens = 0
        self.start = time.perf_counter()

    def finished(self, rows: int) -> None:
        self.bar.update(rows)

    def update(self, rows: int, tokens: int) -> None:
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)
        self.bar.update(rows)

    def close(self) -> None:
        self.bar.close()


class EngineProgress:
    """What vLLM's ``LLM.generate/encode(use_tqdm=callable)`` drives: forwards each finished
    request to a callback, so kdcache's bar moves while a whole shard is in the engine."""

    def __init__(self, callback) -> None:  # noqa: ANN001 - Callable[[int], None]
        self.callback = callback
        self.n = 0
        self.postfix = ""
        self.format_dict = {"elapsed": 1.0}

    @classmethod
    def factory(cls, callback):  # noqa: ANN001, ANN206
        """``use_tqdm`` for vLLM: False without a callback.

        vLLM calls it two ways: ``use_tqdm(prompts, desc=...)`` wraps the prompts it renders
        (returned unchanged: rendering is not what the bar counts) and
        ``use_tqdm(total=..., desc=...)`` opens the bar of finished requests."""
        if callback is None:
            return False

        def use_tqdm(iterable=None, **kwargs):  # noqa: ANN001, ANN202, ARG001
            return iterable if iterable is not None else cls(callback)

        return use_tqdm

    def update(self, n: int = 1) -> None:
        self.n += n
        self.callback(n)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

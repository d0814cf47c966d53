"""User-facing errors: one line that names the file/row and says what to do."""


def first_line(exc: BaseException) -> str:
    """``"Type: first line of the message"``, printable and at most ~200 characters (library
    errors often span many lines; a KdcacheError must stay one)."""
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[0][:200])
    return f"{type(exc).__name__}: {line}"


class KdcacheError(Exception):
    """An error the CLI prints as a single line (no traceback) and exits with status 2."""


class BadRowError(KdcacheError):
    """An input row that cannot be used; `source` is ``"path:row"`` (row is 1-based)."""

    def __init__(self, source: str, problem: str, hint: str = "fix the row or pass --skip-bad-rows") -> None:
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem} ({hint})")

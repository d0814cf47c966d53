"""User-facing errors: one line that names the file/row and says what to do."""


class KdcacheError(Exception):
    """An error the CLI prints as a single line (no traceback) and exits with status 2."""


class BadRowError(KdcacheError):
    """An input row that cannot be used; `source` is ``"path:row"`` (row is 1-based)."""

    def __init__(self, source: str, problem: str, hint: str = "fix the row or pass --skip-bad-rows") -> None:
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem} ({hint})")

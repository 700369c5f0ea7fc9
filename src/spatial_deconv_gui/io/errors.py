from __future__ import annotations


class InputError(ValueError):
    """A problem with the user's files or options, phrased as what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None, code: str = "input"):
        self.problem = problem
        self.fix = fix
        self.code = code
        super().__init__(problem if not fix else f"{problem} Fix: {fix}")

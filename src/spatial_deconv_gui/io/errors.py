from __future__ import annotations


class InputError(ValueError):
    """A problem with the user's files or options, phrased as what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None, code: str = "input"):
        self.problem = problem
        self.fix = fix
        self.code = code
        super().__init__(problem if not fix else f"{problem} Fix: {fix}")

    def __reduce__(self):  # so the error survives the trip back from a child process
        return (type(self), (self.problem, self.fix, self.code))

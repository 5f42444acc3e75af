"""The one exception type users see: it names the problem and the fix."""


class MemkfacError(Exception):
    """A user-facing error. The message says what is wrong and how to fix it.

    The command line prints it without a traceback and exits with status 1 (2 is for usage errors).
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")

"""Errors a person at the command line is shown, without a traceback."""


class MoatError(Exception):
    """A failure the program explains in one line and exits non-zero for."""

    exit_code = 1


class ConfigError(MoatError):
    """A configuration file or option is wrong; the message names the field."""

    exit_code = 2

    def __init__(self, source: str, field: str, problem: str) -> None:
        self.source = source
        self.field = field
        self.problem = problem
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {problem}")

"""The two kinds of failure the CLI tells apart: the user's input (exit 2) and a stage (exit 1)."""


class InputError(Exception):
    """Bad input from the user: a spec, a source file, a stage name. The message names the
    file, field or line; the CLI prints it and exits with code 2."""


class StageError(Exception):
    """A stage failed while building its artifact; the CLI exits with code 1."""


class TransientError(StageError):
    """A failure worth retrying as it is: remote store I/O or an API that kept failing after
    the call-level retries. Prefect retries a stage that raises it (flows/pipeline.py)."""

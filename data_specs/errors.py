"""The kinds of failure the CLI tells apart: the user's input (exit 2), a stage (exit 1), and a
regression gate the finished run did not pass (exit 3)."""


class InputError(Exception):
    """Bad input from the user: a spec, a source file, a stage name. The message names the
    file, field or line; the CLI prints it and exits with code 2."""


class StageError(Exception):
    """A stage failed while building its artifact; the CLI exits with code 1."""


class TransientError(StageError):
    """A failure worth retrying as it is: remote store I/O or an API that kept failing after
    the call-level retries. Prefect retries a stage that raises it (flows/pipeline.py)."""


class GateFailed(Exception):
    """Every stage finished and the report is written, but an `eval.gates` entry failed. The message
    names each failed gate, its value and its threshold; the flow run ends Failed and the CLI exits
    with code 3. Only a message: Prefect may keep it as the failed state's data."""

"""Errors a user can act on.

Every error names the problem and the fix. They subclass ValueError/RuntimeError so that
callers who do not care about the distinction can still catch them broadly.
"""


class DuoServeError(Exception):
    """Base class for errors raised by duoserve_core."""


class CheckpointError(DuoServeError, ValueError):
    """The checkpoint folder, its config or its tensors are missing or malformed."""


class BudgetError(DuoServeError, ValueError):
    """The memory budget cannot hold what the runtime needs."""


class PromptError(DuoServeError, ValueError):
    """The prompt is empty, too long, or cannot be tokenized."""


class DeviceError(DuoServeError, RuntimeError):
    """The requested device does not exist on this machine."""


class SettingError(DuoServeError, ValueError):
    """A runtime setting (compute dtype, expert or attention format) has a value the runtime cannot use."""


class KnobError(DuoServeError, ValueError):
    """A scheduling knob (policy, prefetch depth, predictor threshold) has a value no policy can use."""


class OutputError(DuoServeError, ValueError):
    """An output path exists (and --force was not given), is a folder, or lies under a file."""

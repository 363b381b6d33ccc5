"""The errors a user can fix, each with a message that names the file or key and
the fix. A leaf: it imports nothing of ours, so anything may raise these and the
stage runner (transferlab.stages.run) maps them to exit codes without importing
the modules that raise them."""


class UserError(Exception):
    """An error whose message says what is wrong and how to fix it: a command logs
    it as it is (no traceback) and exits with status 1."""


class ConfigError(UserError, ValueError):
    """A params file that does not describe a valid pipeline (exit status 2)."""


class DataError(UserError, ValueError):
    """Input data that cannot be used; the message names the file and the fix."""


class BudgetError(UserError, ValueError):
    """A budget that cannot hold the pipeline; the message says the smallest one that can."""


class WeightsUnavailable(UserError, RuntimeError):
    """ImageNet weights that could not be fetched or found."""


class WeightsFileError(UserError, ValueError):
    """A weights file that is malformed or holds anything but a state dict."""


class DistributeError(UserError, RuntimeError):
    """A distribution setting this code cannot train under."""


class TuneError(UserError, RuntimeError):
    """A study that cannot run as configured."""


class ModelNotFound(UserError, LookupError):
    """A registered model, alias, version or file that does not exist."""


class ProjectBusy(UserError, RuntimeError):
    """Another pipeline run (or DVC command) holds this project folder."""

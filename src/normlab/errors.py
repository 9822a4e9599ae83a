"""The errors normlab raises for bad user input; the CLI prints their message as one line and exits non-zero."""


class NormlabError(Exception):
    """Base of every error caused by user input (a file, flag, config, checkpoint or shape)."""


class DataError(NormlabError, ValueError):
    """A words file, vocabulary or split that cannot be used."""


class ConfigError(NormlabError, ValueError):
    """An unknown preset, an unknown or ill-typed config key, or an inconsistent configuration."""


class CheckpointError(NormlabError):
    """A run directory that is missing, incomplete, corrupted or does not match its config."""


class TrainingDiverged(NormlabError):
    """The loss became NaN or Inf at `step` (0-based); the message names the step and the likely cause."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class NonFiniteError(NormlabError, ValueError):
    """A model produced NaN or Inf where a number is needed (e.g. the probabilities to sample from)."""


class NormlabWarning(UserWarning):
    """Something the user should know while the command goes on (e.g. a words file changed since training);
    the CLI prints it as one line `normlab: warning: ...`."""

"""User-facing error types.

Anything a user can cause (a bad path, a corrupt file, an impossible size) raises a subclass of
:class:`BagelError` with a one-line, actionable message. The CLI prints that line and exits non-zero;
library users can catch the class. Internal invariants use ``assert``.
"""


class BagelError(Exception):
    """Base class of every error a user can cause and fix."""


class CheckpointError(BagelError, ValueError):
    """A checkpoint directory or file is missing, corrupt, or holds something else."""


class InputError(BagelError, ValueError):
    """An argument of a request is out of range or of the wrong kind."""


class NonFiniteError(BagelError, ArithmeticError):
    """A request produced NaN or infinite values (final latents, decoded image): black images are never saved."""


class OutputError(BagelError, OSError):
    """An output file cannot be written (disk full, no permission); no partial or temporary file is left."""

"""Errors the library raises for problems a user can fix.

Each message names the problem and the fix; the command line prints it on one
line without a traceback.
"""


class BHPEFTError(Exception):
    """Base class of every user-facing error of ``bhpeft_ppl``."""


class SpecError(BHPEFTError, ValueError):
    """A spec, prior map or guide map is invalid or does not fit the model."""


class PosteriorMismatchError(BHPEFTError):
    """A saved posterior does not match the base model or the spec it is loaded into."""


class DivergenceError(BHPEFTError, FloatingPointError):
    """The ELBO or a gradient became NaN or infinite during fitting."""


class CheckpointError(BHPEFTError):
    """A training checkpoint is missing, damaged, or belongs to another run."""


class FitInterrupted(KeyboardInterrupt):
    """Fitting was interrupted (Ctrl-C) after a checkpoint was written; resume from it."""

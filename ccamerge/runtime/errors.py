"""One error hierarchy for the library.

The library raises these and never prints or exits; the CLI turns each into a
one-line message and exit code 1. Anything else that escapes is a bug.
"""

from __future__ import annotations


class CcaMergeError(Exception):
    """Base class of every error a user can cause (bad file, bad option, ...)."""


class CheckpointError(CcaMergeError):
    """A checkpoint cannot be read, or its tensors are unusable."""


class DataError(CcaMergeError):
    """Calibration or evaluation data cannot be read or does not fit the model."""


class ArchitectureError(CcaMergeError):
    """No architecture fits the checkpoint, or checkpoints do not share one."""


class SpecError(CcaMergeError):
    """A merge spec does not fit the tensors it describes."""


class OptionError(CcaMergeError):
    """An option value is invalid (unknown method, bad weights, ...)."""


class NumericalError(CcaMergeError):
    """Non-finite values appeared (weights, activations, statistics)."""


class OutputError(CcaMergeError):
    """The output cannot be written where asked."""


class RefitError(CcaMergeError):
    """The refit cannot run on this network (it cannot be traced, or the endpoints differ)."""

"""One error hierarchy for the library.

The library raises these and never prints or exits; the CLI turns each into a
one-line message and exit code 1. Anything else that escapes is a bug.

An error that something the user can give would remedy, given differently by each
command (one sample's input shape, a spec file, a model factory), names it in
``missing`` instead of naming an option; the run of each command appends how that
command takes it (:func:`remedies`), so no command's message names another's option.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# what an error's ``missing`` may name
MISSING = (
    "input_shape",  # one sample's input shape (a model whose input discovery cannot tell)
    "spec",  # feature groups written by hand (a model torch.fx cannot trace)
    "model",  # a factory of the user's own network (a checkpoint no architecture fits)
)


class CcaMergeError(Exception):
    """Base class of every error a user can cause (bad file, bad option, ...);
    ``missing``: one of :data:`MISSING`, or None."""

    def __init__(self, *args: object, missing: str | None = None) -> None:
        super().__init__(*args)
        if missing is not None and missing not in MISSING:
            raise ValueError(f"missing must be one of {', '.join(MISSING)}, not {missing!r}")
        self.missing = missing


@contextmanager
def remedies(**how: str) -> Iterator[None]:
    """Within the block, an error whose ``missing`` is a key of ``how`` is raised again,
    of the same class, with ``"; " + how[missing]`` appended: how this command takes it."""
    try:
        yield
    except CcaMergeError as e:
        if e.missing not in how:
            raise
        raise type(e)(f"{e}; {how[e.missing]}") from e


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


class UntracedError(RefitError):
    """torch.fx cannot trace the network's own forward (the refit through module hooks
    may still run)."""

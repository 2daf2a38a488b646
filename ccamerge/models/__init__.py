"""Models: what a network is and where its feature groups lie.

Feature groups (``spec``), the architecture registry (``registry``) and its built-in
entries (``archs/``), users' own models through ``--model`` (``custom``), feature groups
found by tracing with torch.fx (``discover``), what a checkpoint does not record
(``assumptions``), and a small training loop for the demo and tests (``train``).

Importing this package (any module in it) registers the built-in architectures, so the
registry is never seen without them.
"""

from . import archs  # noqa: F401  (registers the built-in architectures)

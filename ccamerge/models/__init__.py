"""Models: what a network is and where its feature groups lie.

Feature groups (``spec``), the architecture registry (``registry``) and its built-in
entries (``archs/``), users' own models through ``--model`` (``custom``), feature groups
found by tracing with torch.fx (``discover``), what a checkpoint does not record
(``assumptions``), and a small training loop for the demo and tests (``train``).
"""

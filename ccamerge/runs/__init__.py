"""The runs: each user-facing job composed from the pipeline's steps.

``merge`` (checkpoints to one merged file), ``apply`` (merge again with saved transforms),
``barrier`` (interpolation paths), ``demo`` (the built-in example), ``inspection``
(``ccamerge inspect``), and ``report`` (each run's typed report and its rich rendering).
A run imports the pipeline and the ground floor; nothing below imports a run.
"""

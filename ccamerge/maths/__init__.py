"""The mathematics of merging, free of files and command-line concerns.

Streaming covariances (``stats``), transforming tensors along their feature-group axes
(``algebra``), BatchNorm reset and renormalisation (``bn``), REPAIR and the other remedies
for dense alignment (``repair``), the layer-by-layer least-squares refit (``refit/``: its
traced plan, interpreter, normal equations and memory policy), training a merge against
its inputs' mean logits (``distill``). Modules here import only torch, numpy, scipy, the
models' feature-group spec, tracer and outputs' logits, the methods' ``Alignment`` and the
runtime.
"""

"""The sequential least-squares refit of an assembled merge (docs/refit.md).

After alignment and averaging, every ``nn.Linear`` and ``nn.Conv2d`` of the
merged network is refitted in forward order, in closed form, on unlabelled
calibration data. Layer L, fed with the *merged* network's own inputs x (every
earlier layer already refitted), is fitted to the merge-weighted mean of the
endpoints' outputs mapped into the shared space,

    t = sum_k w_k M_k^a z_k        (a: L's output group; M = I without one),

by ridge regression towards the averaged weights W0 (a folded BatchNorm with the
running statistics a reset on the merged inputs would measure, read off G):

    W^T = (G + lam I)^-1 (R + lam W0^T),  G = sum x x^T,  R = sum x t^T,
    lam = ridge * trace(G) / p.

A BatchNorm that is the layer's only reader is folded into the fit (the target
is read at its output); afterwards the layer gets W and the BatchNorm the true
running statistics of W x with ``weight = sqrt(var + eps)``, ``bias = b + mean``,
so that in eval mode the pair computes W x + b exactly. When the comparison
point's only reader is a residual ``add`` whose other summand the merged network
has already computed, the target is read at the sum and that summand is
subtracted. BatchNorms that no refitted layer feeds get honest running
statistics of their merged inputs, as a BatchNorm reset would measure them. A
LayerNorm over the last axis is fitted in its place, per channel: gain and bias on
its normalised merged input, towards the mapped mean of the endpoints' LayerNorm
outputs (``AffineEquations``).

The network is traced once with ``torch.fx`` (the tracer of feature-group discovery:
a submodule that cannot be traced is an opaque leaf whose layers keep their averaged
weights and whose BatchNorms are reset); its nodes are executed one by one
for the merged network and for every endpoint on every calibration chunk.
The endpoints' outputs at the fits' points are kept from the statistics pass when
they fit in the memory budget (``EndpointOutputs``: the merge then runs N + 1
forward passes in all, N for the statistics and one of the merged network), else
the refit runs the endpoints again (2N + 1).
"stored" mode keeps every chunk's live values between layers; "recompute" mode, used when those would exceed the memory
budget, runs every chunk afresh through the already refitted prefix for each
layer.

Modules: ``plan`` (the traced graph and the steps in it), ``interpret`` (running it node
by node), ``equations`` (the normal equations, a LayerNorm's per-channel equations and
BatchNorm moments), ``memory`` (the
choice between the two modes), ``fit`` (the driver and its report).
"""

from .equations import AffineEquations, NormalEquations
from .fit import MODES, refit
from .interpret import EndpointOutputs
from .memory import default_memory_budget
from .plan import make_plan, output_node
from .settings import DEFAULT_MAX_ROWS, DEFAULT_RIDGE, LayerFit, RefitReport, RefitSettings

__all__ = [
    "AffineEquations",
    "DEFAULT_MAX_ROWS",
    "DEFAULT_RIDGE",
    "EndpointOutputs",
    "MODES",
    "LayerFit",
    "NormalEquations",
    "RefitReport",
    "RefitSettings",
    "default_memory_budget",
    "make_plan",
    "output_node",
    "refit",
]

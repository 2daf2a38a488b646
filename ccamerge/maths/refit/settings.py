"""The refit's settings (what a run asks for) and its report (what each layer's fit did),
shared by the traced refit (:mod:`.fit`) and the refit through module hooks
(:mod:`.hooked`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ...runtime.errors import OptionError

DEFAULT_RIDGE = 1e-3
# rows (samples x output positions) a layer is fitted on at most. Measured (2000 images,
# two models; docs/benchmarks.md): 2^18 rows as accurate as every row (ResNet20 x1: up to
# 2M rows a layer) at a third of the time, and 2^16 as accurate as 2^18 (ResNet20 x1
# 83.2 / 83.2 %, VGG11q 87.8 / 87.9 %) with the refit about 40 % faster
DEFAULT_MAX_ROWS = 1 << 16

# ---------------------------------------------------------------------------
# the report


@dataclass
class LayerFit:
    """One refitted layer. Residuals are ``||W x - t||^2 / ||t||^2`` on the calibration
    data (a LayerNorm: ``W x`` its gain times its normalised input plus its bias), before
    (the averaged weights on the merged inputs) and after the fit."""

    name: str
    kind: str  # "linear", "conv", "layernorm" or "rmsnorm"
    norm: str | None  # the BatchNorm folded into the fit
    residual_sum: bool  # the target is read at a residual sum
    inputs: int  # p: input values per sample, with the constant of a fitted bias
    samples: int  # rows of the fit (samples x output positions)
    residual_before: float | None
    residual_after: float | None
    seconds: float


@dataclass
class RefitReport:
    mode: str  # "stored" or "recompute" (traced), or "module hooks" (:mod:`.hooked`)
    memory_budget: int | None  # bytes that decided the mode (None: free memory unknown)
    ridge: float
    max_rows: int  # the row limit of one layer's fit (0: none)
    # where the endpoints' outputs came from: "statistics pass" (kept there: N + 1 forward
    # passes in the merge) or "refit" (the refit ran the endpoints again: 2N + 1)
    endpoint_outputs: str = "refit"
    layers: list[LayerFit] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0  # the whole refit

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RefitSettings:
    """The refit as a run asks for it: whether it runs, the ridge towards the averaged
    weights, the row limit of one layer's fit (0: none) and the memory budget that decides
    between the stored and the recomputing mode (bytes; None: half the free memory)."""

    enabled: bool = True
    ridge: float = DEFAULT_RIDGE
    max_rows: int = DEFAULT_MAX_ROWS
    memory_budget: int | None = None

    def check(self) -> RefitSettings:
        """Itself, after checking the ridge (finite, >= 0) and the row limit (an integer >= 0)."""
        ridge, max_rows = self.ridge, self.max_rows
        if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
            raise OptionError(f"the refit ridge must be finite and non-negative, got {ridge}")
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0:
            raise OptionError(f"the refit's row limit must be an integer >= 0, got {max_rows}")
        return self

    def record(self) -> dict[str, Any]:
        """What a transforms file records (``apply`` repeats it)."""
        return {"enabled": self.enabled, "ridge": self.ridge, "max_rows": self.max_rows}

    @classmethod
    def from_record(cls, recorded: dict[str, Any]) -> RefitSettings:
        """The settings :meth:`record` wrote (missing values: the defaults; a record
        without ``enabled``: no refit)."""
        ridge, max_rows = recorded.get("ridge"), recorded.get("max_rows")
        return cls(
            enabled=bool(recorded.get("enabled")),
            ridge=DEFAULT_RIDGE if ridge is None else ridge,
            max_rows=DEFAULT_MAX_ROWS if max_rows is None else max_rows,
        ).check()

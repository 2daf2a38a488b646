"""Direct weight averaging: every transform is the identity."""

from __future__ import annotations

from dataclasses import dataclass

from .base import AlignContext, Alignment, MergeMethod, identity_alignment, register_method


@register_method
@dataclass
class Average(MergeMethod):
    name = "average"
    needs_data = False
    description = "direct weight averaging (no alignment)"

    def align(self, ctx: AlignContext) -> Alignment:
        return identity_alignment(ctx.spec, ctx.n_models)

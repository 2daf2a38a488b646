"""Direct weight averaging: every transform is the identity."""

from __future__ import annotations

from typing import ClassVar

from .base import AlignContext, Alignment, MergeMethod, identity_alignment, register_method


@register_method
class Average(MergeMethod):
    name = "average"
    needs_data = False
    description = "direct weight averaging (no alignment)"
    # the identity is a permutation: BatchNorm's vector treatment is exact (plain averaging
    # plus a statistics reset), and one alignment serves both ends of a path
    permutation_only: ClassVar[bool] = True

    def align(self, ctx: AlignContext) -> Alignment:
        return identity_alignment(ctx.spec, ctx.n_models)

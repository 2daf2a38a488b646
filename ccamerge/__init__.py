"""ccamerge: merge neural networks of one architecture with CCA Merge."""

from __future__ import annotations

__version__ = "0.1.0"

"""Built-in architecture entries; importing this module registers them."""

from . import mlp  # noqa: F401

"""Built-in architecture entries; importing this module registers them."""

from . import (
    mlp,  # noqa: F401
    resnet_cifar,  # noqa: F401
    resnet_tv,  # noqa: F401
    vgg,  # noqa: F401
)

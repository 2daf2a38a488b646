"""How each command takes what an error says is ``missing`` (see
:mod:`ccamerge.runtime.errors`): every remedy names only options of its own command
(``tests/test_eval_inspect.py`` checks them against the command line).

A run wraps the steps that can raise such an error in ``remedies(**REMEDIES[command])``.
"""

from __future__ import annotations

OWN_NETWORK = "for a network of your own, pass --model pkg.module:factory (docs/custom-models.md)"


def _registered_only(command: str) -> str:
    return f"{command} takes the registered architectures only (`ccamerge archs` lists them)"


REMEDIES: dict[str, dict[str, str]] = {
    "merge": {
        "input_shape": "give calibration data (--data) or a spec file (--spec)",
        "spec": "write its feature groups by hand and pass them with --spec "
        "(docs/custom-models.md)",
        "model": OWN_NETWORK,
    },
    "inspect": {
        "input_shape": "give one sample's shape with --input-shape, e.g. 3,32,32",
        "spec": "inspect shows only groups it can discover; a merge can take them written "
        "by hand (docs/custom-models.md)",
        "model": OWN_NETWORK,
    },
    "eval": {"model": _registered_only("eval")},
    "barrier": {"model": _registered_only("barrier")},
}

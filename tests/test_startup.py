"""Start-up: the package and the command line load without torch, so that ``ccamerge
--help`` and ``--version`` answer at once; the lazy names still work. Each check runs a
fresh interpreter (this one has long imported torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import ccamerge

# what a command imports only when it runs
HEAVY = ("torch", "numpy", "scipy", "safetensors", "matplotlib", "rich")
HEAVY_OF_CCAMERGE = ("ccamerge.runs", "ccamerge.pipeline", "ccamerge.methods", "ccamerge.models")


def loaded_after(code: str) -> list[str]:
    """The heavy modules loaded after running ``code`` in a fresh interpreter (the
    command line's ``SystemExit`` included)."""
    probe = "\n".join(
        [
            "import json, sys",
            "try:",
            *(f"    {line}" for line in code.splitlines()),
            "except SystemExit:",
            "    pass",
            f"heavy = {HEAVY + HEAVY_OF_CCAMERGE!r}",
            "print(json.dumps([m for m in heavy if m in sys.modules]), file=sys.stderr)",
        ]
    )
    res = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stderr.strip().splitlines()[-1])


def test_the_typer_app_registers_its_commands_without_torch():
    assert loaded_after("import ccamerge.cli.app") == []
    assert loaded_after("import ccamerge.cli") == []


@pytest.mark.parametrize(
    "args, loaded",
    [(["--version"], []), (["--help"], ["rich"]), ([], ["rich"])],  # typer's help page: rich
)
def test_version_and_help_do_not_import_torch(args, loaded):
    code = f"import sys\nsys.argv = ['ccamerge', *{args!r}]\nfrom ccamerge.cli import main\nmain()"
    assert loaded_after(code) == loaded


def test_import_ccamerge_is_light_and_its_names_load_on_use():
    assert loaded_after("import ccamerge") == []
    code = "\n".join(
        [
            "import ccamerge",
            "print(json.dumps([ccamerge.list_architectures(), ccamerge.list_methods()]))",
        ]
    )
    res = subprocess.run(
        [sys.executable, "-c", f"import json\n{code}"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    architectures, methods = json.loads(res.stdout)
    assert {"mlp", "resnet", "resnet_cifar", "vgg"} <= set(architectures)
    assert {"average", "cca", "permute", "weight-matching", "zipit"} <= set(methods)


def test_every_exported_name_resolves():
    for name in ccamerge.__all__:
        assert getattr(ccamerge, name) is not None, name
    assert set(ccamerge.__all__) <= set(dir(ccamerge))
    assert set(ccamerge.__all__) == {"__version__", *ccamerge._EXPORTS}
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        ccamerge.nothing_here  # noqa: B018

"""Running the command line in tests: ``run`` invokes ``ccamerge`` in-process, ``refused``
checks that a run failed the way every refused command must (one line, no traceback)."""

from __future__ import annotations

from typer.testing import CliRunner

from ccamerge.cli import app

runner = CliRunner()


def run(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def refused(res, code: int = 1) -> str:
    """The run failed with ``code``, one line on stderr, nothing on stdout; that line."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == code, (res.exit_code, res.stderr, res.exception)
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout == ""
    assert lines[0].startswith("error: ")
    return lines[0]

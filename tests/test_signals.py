"""SIGTERM and SIGHUP stop a run like Ctrl-C: one line, nothing written, no temporary
file left, the conventional exit codes 143 and 129; Ctrl-C while torch is still being
imported gives one line too, not a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_bad_input import Env, refused

from ccamerge.io import files as ccfiles

SIGNALS = {"SIGTERM": 143, "SIGHUP": 129}


@pytest.fixture
def env(tmp_path) -> Env:
    torch.set_num_threads(1)
    return Env(tmp_path)


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_signal_while_writing_leaves_nothing(env, monkeypatch, name):
    real_fsync = os.fsync

    def fsync_then_signal(fd):
        real_fsync(fd)
        os.kill(os.getpid(), getattr(signal, name))  # delivered to this process, for real

    monkeypatch.setattr(ccfiles.os, "fsync", fsync_then_signal)
    previous = signal.getsignal(getattr(signal, name))
    for out in (env.out, env.existing):  # a new file, and one to overwrite with --force
        line = refused(env.merge("--force", out=out), SIGNALS[name])
        assert line == f"error: terminated by {name}; nothing was written"
        env.unchanged()
    assert signal.getsignal(getattr(signal, name)) is previous  # the handler is given back


def _command(*prefix: str) -> list[str]:
    code = "; ".join(
        [
            "import sys",
            "sys.argv[0] = 'ccamerge'",
            *prefix,
            "from ccamerge.cli import main",
            "main()",
        ]
    )
    return [sys.executable, "-c", code]


def _wait_for_stdin_read(proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until the process blocks reading its standard input (the command is running)."""
    wchan = Path(f"/proc/{proc.pid}/wchan")
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if "pipe" in wchan.read_text():
            return
        time.sleep(0.05)
    pytest.fail("the command never waited on its standard input")


@pytest.mark.skipif(not Path("/proc/self/wchan").exists(), reason="needs /proc/PID/wchan")
@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_signal_to_a_running_command(env, name):
    out = env.out_dir / "m.safetensors"
    proc = subprocess.Popen(
        [*_command(), "merge", str(env.a), str(env.b), "--data", "-", "-o", str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        _wait_for_stdin_read(proc)
        proc.send_signal(getattr(signal, name))
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == SIGNALS[name]
    assert stderr.decode() == f"error: terminated by {name}; nothing was written\n"
    assert stdout == b""
    env.unchanged()


def test_ctrl_c_while_torch_is_imported():
    """SIGINT 0.3 s after start lands in `import torch` (which takes seconds)."""
    prefix = (
        "import os, signal, threading",
        "threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()",
    )
    res = subprocess.run(
        [*_command(*prefix), "archs"],
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert res.returncode == 130
    assert res.stderr.decode() == "error: interrupted; nothing was written\n"
    assert res.stdout == b""

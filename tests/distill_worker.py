"""Run by tests/test_distill.py, alone or under torchrun: distil the plain average of
two MLP checkpoints against them on the digits and save the student and its report.

    python tests/distill_worker.py A.pt B.pt OUT.pt
"""

from __future__ import annotations

import sys

import torch

from ccamerge.maths.distill import DistillSettings, distill
from ccamerge.models.archs.mlp import MLP
from ccamerge.models.train import digits
from ccamerge.runtime import distributed

SETTINGS = DistillSettings(epochs=2, lr=1e-3, batch_size=64)


def mlp(state_dict: dict[str, torch.Tensor]) -> MLP:
    model = MLP([64, 64, 64, 10])
    model.load_state_dict(state_dict)
    return model.eval()


def run(paths: list[str], out: str) -> None:
    """Training data streamed in chunks of 500 rows (batches straddle chunks)."""
    distributed.setup("cpu")
    train, test = digits()
    teachers = [mlp(torch.load(p)) for p in paths]
    sds = [t.state_dict() for t in teachers]
    student = mlp({k: (sds[0][k] + sds[1][k]) / 2 for k in sds[0]})
    report = distill(student, teachers, [0.5, 0.5], lambda: train.x.split(500), test.x, SETTINGS)
    if distributed.is_main():
        torch.save({"state": student.state_dict(), "report": report.to_dict()}, out)
    distributed.synchronise()
    if distributed.launched():
        distributed.exit_worker(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1:3], sys.argv[3])

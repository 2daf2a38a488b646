"""Fashion-MNIST for the benchmarks, read from the Debian package ``dataset-fashion-mnist``.

The package installs the original IDX files (gzip-compressed) under
``/usr/share/datasets/fashion-mnist/``. When they are missing this module tries
``apt-get install -y dataset-fashion-mnist`` and stops with a clear message if
that fails. The IDX format is read here with gzip + numpy (no torchvision).

Two views of the same images:

* ``flat``: (n, 784) float32, for MLPs;
* ``cifar``: (n, 3, 32, 32) float32, zero-padded by 2 pixels on each side (after
  normalisation, so the padding is the dataset mean) and repeated to 3 channels,
  for the CIFAR-style VGG and ResNet.

Both are normalised with the training split's pixel mean and std (one scalar
each). ``write_npz`` writes calibration and test sets as ``.npz`` files
(arrays ``x`` float32 and ``y`` int64) that ``ccamerge merge --data`` reads.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
CACHE = Path(__file__).resolve().parent / "cache"


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (optionally gzip-compressed) as a numpy array.

    IDX: 2 zero bytes, a type code (0x08 = uint8), the number of dimensions,
    then one big-endian int32 per dimension, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {data.size} values for shape {shape}")
    return data.reshape(shape)


def ensure_files(data_dir: Path = DATA_DIR) -> Path:
    """The directory holding the four IDX files; installs the Debian package if needed."""
    if all((data_dir / f).exists() for f in FILES.values()):
        return data_dir
    print(
        f"Fashion-MNIST not found in {data_dir}; trying apt-get install -y dataset-fashion-mnist",
        file=sys.stderr,
    )
    apt = shutil.which("apt-get")
    if apt is not None:
        cmd = [apt, "install", "-y", "dataset-fashion-mnist"]
        try:
            subprocess.run(cmd, check=True)
        except (subprocess.CalledProcessError, OSError) as e:
            print(f"apt-get failed: {e}", file=sys.stderr)
    if all((data_dir / f).exists() for f in FILES.values()):
        return data_dir
    raise SystemExit(
        f"Fashion-MNIST IDX files are missing from {data_dir}. Install them with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu) and rerun."
    )


def load_raw(data_dir: Path = DATA_DIR) -> dict[str, np.ndarray]:
    d = ensure_files(data_dir)
    return {k: read_idx(d / f) for k, f in FILES.items()}


def prepare(view: str, data_dir: Path = DATA_DIR) -> dict[str, np.ndarray]:
    """``{"train_x", "train_y", "test_x", "test_y"}`` in the given view (``flat``/``cifar``).

    Built in memory from the IDX files each time (about 2 s; the ``cifar`` view of the
    training split takes 0.7 GB)."""
    if view not in ("flat", "cifar"):
        raise ValueError(f"unknown view {view!r}")
    raw = load_raw(data_dir)
    train = raw["train_x"].astype(np.float32) / 255.0
    test = raw["test_x"].astype(np.float32) / 255.0
    mean, std = float(train.mean()), float(train.std())
    train, test = (train - mean) / std, (test - mean) / std
    out = {"train_y": raw["train_y"].astype(np.int64), "test_y": raw["test_y"].astype(np.int64)}
    if view == "flat":
        out["train_x"] = train.reshape(len(train), 784)
        out["test_x"] = test.reshape(len(test), 784)
    else:
        pad = (0.0 - mean) / std  # a black pixel after normalisation
        for name, a in (("train_x", train), ("test_x", test)):
            p = np.full((len(a), 32, 32), pad, dtype=np.float32)
            p[:, 2:30, 2:30] = a
            out[name] = np.ascontiguousarray(np.repeat(p[:, None], 3, axis=1))
    return out


def splits(seed: int = 1234, n_calib: int = 10000) -> dict[str, np.ndarray]:
    """Fixed index split of the 60000 training images: ``calib`` (``n_calib`` images, used
    for merge statistics and BatchNorm resets) and ``train`` (the other ones, used for
    training). Calibration samples are never trained on, like a user's held-out data."""
    perm = np.random.default_rng(seed).permutation(60000)
    return {"calib": perm[:n_calib], "train": perm[n_calib:]}


def write_npz(view: str, out_dir: Path = CACHE) -> dict[str, Path]:
    """Write ``fmnist_{view}_calib.npz`` (the 10000 calibration images, in the fixed order:
    the first n are the n-sample calibration set) and ``fmnist_{view}_test.npz``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "calib": out_dir / f"fmnist_{view}_calib.npz",
        "test": out_dir / f"fmnist_{view}_test.npz",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    data = prepare(view)
    idx = splits()["calib"]
    for name, (x, y) in {
        "calib": (data["train_x"][idx], data["train_y"][idx]),
        "test": (data["test_x"], data["test_y"]),
    }.items():
        tmp = paths[name].with_suffix(".tmp.npz")
        np.savez(tmp, x=x, y=y)
        tmp.replace(paths[name])
    return paths


if __name__ == "__main__":
    for v in ("flat", "cifar"):
        for k, p in write_npz(v).items():
            print(v, k, p)

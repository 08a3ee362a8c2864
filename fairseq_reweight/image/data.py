"""Datasets as in-memory uint8 arrays: CIFAR-10/100 (python-pickle format) and Fashion-MNIST (IDX).

Locations, in order: ``--data-dir``; the environment variable (``CIFAR10_DIR``, ``CIFAR100_DIR``,
``FASHION_MNIST_DIR``); the default (``data/cifar-10-batches-py``, ``data/cifar-100-python``,
``/usr/share/datasets/fashion-mnist`` -- where Debian's ``dataset-fashion-mnist`` puts the IDX files).
A directory that holds the standard sub-directory (``cifar-10-batches-py``, ``cifar-100-python``)
is accepted too. CIFAR is downloaded only with ``--download`` (and a network).

The pickles are read with a restricted unpickler (plain containers and numpy arrays only), so a
tampered file cannot run code.
"""

import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class DatasetInfo:
    env: str
    default: str
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    flip: bool  # horizontal flips are label-preserving
    url: Optional[str] = None
    md5: Optional[str] = None


DATASETS = {
    # normalisation of MW-Net (CIFAR-10) and of the WRN code (CIFAR-100)
    "cifar10": DatasetInfo("CIFAR10_DIR", "data/cifar-10-batches-py", 10, (0.4914, 0.4824, 0.4467),
                           (0.2471, 0.2435, 0.2616), True,
                           "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                           "c58f30108f718f92721af3b95e74349a"),
    "cifar100": DatasetInfo("CIFAR100_DIR", "data/cifar-100-python", 100, (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762), True,
                            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                            "eb9058c3a382ffc7106e4002c42a8d85"),
    # clothes are left-right symmetric classes (a mirrored sneaker is still a sneaker)
    "fashion-mnist": DatasetInfo("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist", 10, (0.2860,), (0.3530,),
                                 True),
}

FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}


class DataError(ValueError):
    """Missing or malformed dataset files; the message says how to fix it."""


@dataclass
class ImageData:
    name: str
    train_x: np.ndarray  # uint8 [N, C, H, W]
    train_y: np.ndarray  # int64 [N]
    test_x: np.ndarray
    test_y: np.ndarray
    info: DatasetInfo

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]


def _fix_hint(name: str, info: DatasetInfo) -> str:
    if name == "fashion-mnist":
        return ("install it with `apt-get install dataset-fashion-mnist` (IDX files in "
                f"{info.default}), or point --data-dir / ${info.env} at a directory with "
                f"{', '.join(FASHION_FILES.values())} (optionally .gz)")
    sub = Path(info.default).name
    return (f"point --data-dir / ${info.env} at the extracted '{sub}' directory of {info.url}, "
            "or add --download to fetch it (needs a network)")


def resolve_dir(name: str, data_dir: Optional[str] = None) -> Path:
    if name not in DATASETS:
        raise DataError(f"unknown --dataset {name!r}: use one of {', '.join(DATASETS)}")
    info = DATASETS[name]
    path = Path(data_dir or os.environ.get(info.env) or info.default).expanduser()
    sub = Path(info.default).name
    if name != "fashion-mnist" and not _looks_like_cifar(path) and path.name != sub:
        return path / sub  # a parent directory of the standard one
    return path


def _looks_like_cifar(path: Path) -> bool:
    return (path / "test_batch").exists() or (path / "test").exists()


# ---------------------------------------------------------------------- CIFAR (python pickles)
class _SafeUnpickler(pickle.Unpickler):
    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DataError(f"{path} is not a CIFAR python pickle ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR python pickle (a {type(obj).__name__}, expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_arrays(path: Path, label_key: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    d = _load_pickle(path)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path} lacks the 'data'/'{label_key}' entries of the CIFAR pickle format")
    x = np.asarray(d["data"], dtype=np.uint8)
    y = np.asarray(d[label_key], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
        raise DataError(f"{path}: expected data [N, 3072] and N labels, got {x.shape} and {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{path}: labels must be in 0..{num_classes - 1}")
    return x.reshape(-1, 3, 32, 32), y


def load_cifar(name: str, root: Path) -> ImageData:
    info = DATASETS[name]
    if name == "cifar10":
        train_files, test_file, key = [root / f"data_batch_{i}" for i in range(1, 6)], root / "test_batch", "labels"
    else:
        train_files, test_file, key = [root / "train"], root / "test", "fine_labels"
    missing = [p.name for p in train_files + [test_file] if not p.is_file()]
    if missing:
        raise DataError(f"{name}: {root} lacks {', '.join(missing)}; {_fix_hint(name, info)}")
    try:
        parts = [_cifar_arrays(p, key, info.num_classes) for p in train_files]
        test_x, test_y = _cifar_arrays(test_file, key, info.num_classes)
    except DataError as e:  # the files are there but not the python version of this dataset
        raise DataError(f"{name}: {e}; {_fix_hint(name, info)}") from None
    return ImageData(name, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                     test_x, test_y, info)


def download_cifar(name: str, root: Path) -> None:
    """Fetch and extract the official tarball so that ``root`` is the extracted directory."""
    info = DATASETS[name]
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root} exists but is not a {name} directory; move it away or pass another --data-dir")
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():
        root.rmdir()
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        archive = Path(tmp) / Path(info.url).name
        print(f"downloading {info.url} ...", flush=True)
        try:
            with urllib.request.urlopen(info.url, timeout=60) as r, open(archive, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            raise DataError(f"could not download {info.url} ({e}); without a network, copy the extracted "
                            f"'{Path(info.default).name}' directory here and pass --data-dir") from None
        if hashlib.md5(archive.read_bytes()).hexdigest() != info.md5:
            raise DataError(f"{info.url}: checksum mismatch, the download is corrupt; try again")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (Path(tmp) / Path(info.default).name).rename(root)


# ---------------------------------------------------------------------- Fashion-MNIST (IDX)
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip-compressed or raw) of unsigned bytes as a numpy array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"{path}: the IDX header says {shape} but the file has {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(root: Path) -> ImageData:
    info = DATASETS["fashion-mnist"]
    arrays = {}
    for key, stem in FASHION_FILES.items():
        path = next((p for p in (root / stem, root / f"{stem}.gz") if p.is_file()), None)
        if path is None:
            raise DataError(f"fashion-mnist: {root} lacks {stem}[.gz]; {_fix_hint('fashion-mnist', info)}")
        try:
            arrays[key] = read_idx(path)
        except (DataError, OSError, EOFError, zlib.error) as e:  # the last three: a cut or corrupt .gz file
            raise DataError(f"fashion-mnist: {e if isinstance(e, DataError) else f'{path}: {e}'}; the files must "
                            f"be the original IDX files: {_fix_hint('fashion-mnist', info)}") from None
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"fashion-mnist {split}: expected images [N, H, W] and N labels, "
                            f"got {x.shape} and {y.shape} (images and labels files swapped or from different "
                            f"datasets?); {_fix_hint('fashion-mnist', info)}")
        if len(y) and y.max() >= info.num_classes:
            raise DataError(f"fashion-mnist {split}: labels must be in 0..9; {_fix_hint('fashion-mnist', info)}")
    return ImageData("fashion-mnist", arrays["train_x"][:, None].copy(), arrays["train_y"].astype(np.int64),
                     arrays["test_x"][:, None].copy(), arrays["test_y"].astype(np.int64), info)


def load_dataset(name: str, data_dir: Optional[str] = None, download: bool = False) -> ImageData:
    """Load ``name`` ('cifar10', 'cifar100', 'fashion-mnist'); see the module docstring for locations."""
    root = resolve_dir(name, data_dir)
    info = DATASETS[name]
    if name == "fashion-mnist":
        if download:
            raise DataError("--download is for CIFAR; " + _fix_hint(name, info))
        return load_fashion_mnist(root)
    if download and not _looks_like_cifar(root):
        download_cifar(name, root)
    return load_cifar(name, root)

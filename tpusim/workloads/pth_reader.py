"""Read a PyTorch checkpoint (``.pth``/``.pt`` state dict) into numpy arrays without importing torch.

Two on-disk formats exist. Since torch 1.6 a checkpoint is a zip archive holding ``<root>/data.pkl``
and one raw little-endian file per storage (``<root>/data/<key>``). Older checkpoints (the
"legacy" format) are a sequence of pickles -- a magic number, a protocol version, system info,
the object itself, the list of storage keys -- followed by each storage as an 8-byte element count
and its raw bytes, in the order of that list.

In both, the object pickle refers to storages through persistent ids
``('storage', <StorageType>, key, location, numel[, view_metadata])`` and rebuilds each tensor with
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``. The unpickler here is
restricted: it resolves only those names (plus ``collections.OrderedDict``) and refuses every other
global, so a checkpoint cannot run code while it is read.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tpusim.errors import ModelError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# Storage class name -> numpy dtype of one element (all little-endian on disk).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # widened to float32 after reading
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _StorageType:
    """Stands in for ``torch.FloatStorage`` etc. in the pickle: only its element type matters."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class _Storage:
    """A flat typed buffer; filled from the archive (zip) or after the object pickle (legacy)."""

    def __init__(self, storage_type: _StorageType, numel: int) -> None:
        self.storage_type = storage_type
        self.numel = numel
        self.data: np.ndarray | None = None


class _View:
    """A legacy storage view: ``numel`` elements of ``base`` starting at ``offset``."""

    def __init__(self, base: _Storage, offset: int, numel: int) -> None:
        self.base, self.offset, self.numel = base, offset, numel


class _LazyTensor:
    """A tensor whose storage bytes may not have been read yet; materialised after loading."""

    def __init__(self, storage: _Storage | _View, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def to_numpy(self, where: str) -> np.ndarray:
        storage, offset = self.storage, self.offset
        if isinstance(storage, _View):
            storage, offset = storage.base, storage.offset + offset
        flat = storage.data
        if flat is None:
            raise ModelError(f"{where}: storage data missing from the checkpoint")
        if self.size and any(d == 0 for d in self.size):
            array = np.empty(self.size, dtype=flat.dtype)
        else:
            last = offset + sum((d - 1) * s for d, s in zip(self.size, self.stride))
            if offset < 0 or last >= flat.size:
                raise ModelError(f"{where}: tensor of size {self.size} and stride {self.stride} at offset "
                                 f"{offset} reaches beyond its storage of {flat.size} elements")
            strides = tuple(s * flat.itemsize for s in self.stride)
            view = np.lib.stride_tricks.as_strided(flat[offset:], shape=self.size, strides=strides)
            array = np.array(view, order="C")  # C-contiguous copy, independent of the file buffer
        if storage.storage_type.name == "BFloat16Storage":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(array.dtype.newbyteorder("="), copy=False)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _LazyTensor:
    return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_ignored):
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, where: str, storages: dict[str, _Storage]) -> None:
        super().__init__(file)
        self._where = where
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise ModelError(f"{self._where}: the checkpoint refers to {module}.{name}, which a state-dict reader "
                         "does not load (only tensors and dicts are allowed)")

    def persistent_load(self, pid: Any) -> _Storage | _View:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise ModelError(f"{self._where}: unexpected persistent id {pid!r:.80}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise ModelError(f"{self._where}: storage {key} has no known element type")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(storage_type, numel)
        view_metadata = pid[5] if len(pid) > 5 else None
        if view_metadata is not None:
            _view_key, view_offset, view_numel = view_metadata
            return _View(storage, int(view_offset), int(view_numel))
        return storage


def _materialise(obj: Any, where: str) -> Any:
    if isinstance(obj, _LazyTensor):
        return obj.to_numpy(where)
    if isinstance(obj, dict):
        return collections.OrderedDict((k, _materialise(v, where)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, where) for v in obj)
    return obj


def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ModelError(f"{path}: a zip checkpoint must hold exactly one data.pkl, found {len(pickles)}")
        root = pickles[0][: -len("data.pkl")]
        storages: dict[str, _Storage] = {}
        obj = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), str(path), storages).load()
        for key, storage in storages.items():
            member = f"{root}data/{key}"
            if member not in names:
                raise ModelError(f"{path}: storage file {member} is missing")
            raw = archive.read(member)
            _fill(storage, raw, path, key)
    return obj


def _fill(storage: _Storage, raw: bytes, path: Path, key: str) -> None:
    dtype = storage.storage_type.dtype
    if len(raw) < storage.numel * dtype.itemsize:
        raise ModelError(f"{path}: storage {key} holds {len(raw)} bytes, expected {storage.numel * dtype.itemsize}")
    storage.data = np.frombuffer(raw, dtype=dtype, count=storage.numel)


def _load_legacy(path: Path) -> Any:
    where = str(path)
    with open(path, "rb") as f:
        try:
            magic = pickle.load(f)
            protocol = pickle.load(f)
            sys_info = pickle.load(f)
        except Exception:
            raise ModelError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy pickle)") from None
        if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL:
            raise ModelError(f"{path}: not a PyTorch checkpoint (bad magic number or protocol)")
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise ModelError(f"{path}: big-endian checkpoints are not supported")
        storages: dict[str, _Storage] = {}
        obj = _RestrictedUnpickler(f, where, storages).load()
        keys = pickle.load(f)
        for key in keys:
            key = str(key)
            if key not in storages:
                raise ModelError(f"{path}: storage {key} is listed but never used")
            storage = storages[key]
            header = f.read(8)
            if len(header) != 8:
                raise ModelError(f"{path}: file ends before storage {key}")
            (numel,) = struct.unpack("<q", header)
            if numel != storage.numel:
                raise ModelError(f"{path}: storage {key} holds {numel} elements, the pickle says {storage.numel}")
            _fill(storage, f.read(numel * storage.storage_type.dtype.itemsize), path, key)
    return obj


def load_checkpoint(path: Path | str) -> Any:
    """The pickled object of a checkpoint with every tensor as a numpy array."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such checkpoint file")
    try:
        obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, ValueError, TypeError) as exc:
        raise ModelError(f"{path}: corrupt checkpoint ({type(exc).__name__}: {exc})") from None
    return _materialise(obj, str(path))


def read_state_dict(path: Path | str) -> dict[str, np.ndarray]:
    """A state dict ``{name: array}`` in file order; a wrapping ``{'state_dict': ...}`` is unwrapped."""
    obj = load_checkpoint(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise ModelError(f"{path}: not a state dict (expected a mapping from names to tensors)")
    return dict(obj)

"""The torch-free checkpoint reader: legacy and zip formats, strides, dtypes, refusal of code, against torch.load."""
from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tpusim.errors import ModelError
from tpusim.workloads.pth_reader import LEGACY_MAGIC, LEGACY_PROTOCOL, read_state_dict


def _write_legacy(path: Path, payload: bytes, storages: list[tuple[str, np.ndarray]]) -> None:
    """A legacy checkpoint: magic, protocol, sys info, the object pickle, storage keys, raw storages."""
    with open(path, "wb") as f:
        for obj in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": LEGACY_PROTOCOL, "little_endian": True}):
            pickle.dump(obj, f, protocol=2)
        f.write(payload)
        pickle.dump([key for key, _ in storages], f, protocol=2)
        for _, data in storages:
            f.write(struct.pack("<q", data.size))
            f.write(data.tobytes())


def _pickle_state(entries: dict[str, tuple]) -> bytes:
    """Hand-assembled protocol-2 pickle of an OrderedDict of _rebuild_tensor_v2 calls."""
    out = bytearray(b"\x80\x02")
    out += b"ccollections\nOrderedDict\n)R("
    for name, (storage_type, key, numel, offset, size, stride) in entries.items():
        out += b"X" + struct.pack("<I", len(name)) + name.encode()
        out += b"ctorch._utils\n_rebuild_tensor_v2\n("
        out += b"(X" + struct.pack("<I", 7) + b"storage" + f"ctorch\n{storage_type}\n".encode()
        out += b"X" + struct.pack("<I", len(key)) + key.encode() + b"X\x03\x00\x00\x00cpu"
        out += b"J" + struct.pack("<i", numel) + b"Nt" + b"Q"
        out += b"J" + struct.pack("<i", offset)
        out += b"(" + b"".join(b"J" + struct.pack("<i", d) for d in size) + b"t"
        out += b"(" + b"".join(b"J" + struct.pack("<i", d) for d in stride) + b"t"
        out += b"\x89}tR"
    out += b"u."
    return bytes(out)


def test_legacy_format_with_strides_offsets_and_dtypes(tmp_path: Path) -> None:
    floats = np.arange(12, dtype="<f4")
    longs = np.array([7, -3], dtype="<i8")
    payload = _pickle_state({
        "w_t": ("FloatStorage", "0", 12, 0, (3, 4), (1, 3)),   # a transposed (column-major) view
        "w_tail": ("FloatStorage", "0", 12, 8, (2, 2), (2, 1)),  # offset into the same storage
        "count": ("LongStorage", "1", 2, 1, (), ()),            # 0-d tensor at offset 1
    })
    path = tmp_path / "legacy.pth"
    _write_legacy(path, payload, [("0", floats), ("1", longs)])
    state = read_state_dict(path)
    assert list(state) == ["w_t", "w_tail", "count"]
    np.testing.assert_array_equal(state["w_t"], floats.reshape(4, 3).T)
    assert state["w_t"].flags.c_contiguous
    np.testing.assert_array_equal(state["w_tail"], [[8, 9], [10, 11]])
    assert state["count"].dtype == np.int64 and state["count"].shape == () and int(state["count"]) == -3


def test_zip_format(tmp_path: Path) -> None:
    data = np.array([1.5, -2.0, 3.25, 4.0, 5.0, 6.0], dtype="<f8")
    pkl = _pickle_state({"x": ("DoubleStorage", "0", 6, 0, (2, 3), (3, 1))})
    path = tmp_path / "new.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("new/data.pkl", pkl)
        archive.writestr("new/data/0", data.tobytes())
    state = read_state_dict(path)
    np.testing.assert_array_equal(state["x"], data.reshape(2, 3))
    assert state["x"].dtype == np.float64


def test_refuses_arbitrary_globals(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    evil = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueR."
    _write_legacy(path, evil, [])
    with pytest.raises(ModelError, match="os.system"):
        read_state_dict(path)


def test_truncated_and_foreign_files_are_one_line_model_errors(tmp_path: Path) -> None:
    payload = _pickle_state({"w": ("FloatStorage", "0", 4, 0, (4,), (1,))})
    path = tmp_path / "short.pth"
    _write_legacy(path, payload, [("0", np.zeros(4, "<f4"))])
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ModelError, match="short.pth"):
        read_state_dict(path)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(ModelError, match="not a PyTorch checkpoint"):
        read_state_dict(text)
    with pytest.raises(ModelError, match="no such checkpoint"):
        read_state_dict(tmp_path / "missing.pth")


def test_matches_torch_load_on_the_pretrained_checkpoint_and_a_zip_resave(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    weights = pytest.importorskip("tpusim.workloads.efficientnet_lite")
    try:
        path = weights.weights_path()
    except ModelError as exc:
        pytest.skip(str(exc))
    ours = read_state_dict(path)
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ours) == list(theirs)
    for key, tensor in theirs.items():
        np.testing.assert_array_equal(ours[key], tensor.numpy(), err_msg=key)
        assert ours[key].dtype == tensor.numpy().dtype
    resaved = tmp_path / "resaved.pth"
    torch.save({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in list(theirs.items())[:20]}, resaved)
    assert zipfile.is_zipfile(resaved)
    for key, array in read_state_dict(resaved).items():
        np.testing.assert_array_equal(array, theirs[key].to(torch.float16).numpy() if theirs[key].is_floating_point()
                                      else theirs[key].numpy())

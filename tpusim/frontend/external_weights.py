"""An ONNX model file's bytes with its large weights left where they are in the file.

ONNX Runtime parses a model's bytes into a protobuf copy of every weight before it makes its own tensors
of them: ResNet-50's session took 0.32-0.41 s from the file's bytes, 0.12-0.16 s with the weights as
external data. :func:`weights_in_place` rewrites the bytes without reading the weights: each large
``raw_data`` of the main graph's initializers becomes an external-data reference to those same bytes in the
file itself (its name as the location, their offset and length), which ONNX Runtime then reads from the
file, with the model's folder given as the folder of external data. Only the protobuf framing around the
weights is walked (field keys and lengths), not the weights.
"""
from __future__ import annotations

import mmap
from pathlib import Path

_MODEL_GRAPH = 7         # ModelProto.graph
_GRAPH_INITIALIZER = 5   # GraphProto.initializer
_TENSOR_RAW_DATA = 9     # TensorProto.raw_data
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14
_EXTERNAL = 1            # TensorProto.DataLocation.EXTERNAL
_LENGTH_DELIMITED, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5

# Weights smaller than this stay in the bytes: their reading costs less than a reference to them.
MIN_EXTERNAL_BYTES = 4096


class _NotPlain(Exception):
    """The bytes are framed in a way this rewrite does not handle (groups, a repeated graph field)."""


def _varint(data, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data):
            raise _NotPlain
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _encoded_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(data, start: int, stop: int):
    """(field number, wire type, start of the field's key, start of its payload, end of the field) in order."""
    at = start
    while at < stop:
        key_at = at
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, end = _varint(data, at)
            payload = at
        elif wire == _LENGTH_DELIMITED:
            length, payload = _varint(data, at)
            end = payload + length
        elif wire in (_FIXED64, _FIXED32):
            payload, end = at, at + (8 if wire == _FIXED64 else 4)
        else:
            raise _NotPlain
        if end > stop:
            raise _NotPlain
        yield number, wire, key_at, payload, end
        at = end


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _encoded_varint(number << 3 | _LENGTH_DELIMITED) + _encoded_varint(len(payload)) + payload


def _entry(key: str, value: str) -> bytes:
    """A StringStringEntryProto (key = 1, value = 2) as TensorProto.external_data."""
    return _length_delimited(_TENSOR_EXTERNAL_DATA,
                             _length_delimited(1, key.encode()) + _length_delimited(2, value.encode()))


def _tensor(data, start: int, stop: int, location: str) -> bytes | None:
    """The initializer's bytes with its raw data referred to in place, or None to keep it as it is."""
    raw = [(payload, end) for number, wire, _, payload, end in _fields(data, start, stop)
           if number == _TENSOR_RAW_DATA and wire == _LENGTH_DELIMITED]
    if len(raw) != 1 or raw[0][1] - raw[0][0] < MIN_EXTERNAL_BYTES:
        return None
    kept = []
    for number, _, key_at, _, end in _fields(data, start, stop):
        if number in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION):
            return None  # (already external: left to ONNX Runtime as it is)
        if number != _TENSOR_RAW_DATA:
            kept.append(bytes(data[key_at:end]))
    offset, end = raw[0]
    return b"".join(kept + [_entry("location", location), _entry("offset", str(offset)),
                            _entry("length", str(end - offset)),
                            _encoded_varint(_TENSOR_DATA_LOCATION << 3 | _VARINT) + _encoded_varint(_EXTERNAL)])


def _graph(data, start: int, stop: int, location: str) -> tuple[bytes, int]:
    """The graph's bytes with its large initializers referred to in place, and how many were."""
    parts, moved = [], 0
    for number, wire, key_at, payload, end in _fields(data, start, stop):
        if number == _GRAPH_INITIALIZER and wire == _LENGTH_DELIMITED:
            tensor = _tensor(data, payload, end, location)
            if tensor is not None:
                parts.append(_length_delimited(_GRAPH_INITIALIZER, tensor))
                moved += 1
                continue
        parts.append(bytes(data[key_at:end]))
    return b"".join(parts), moved


def weights_in_place(path: str | Path, appended: bytes = b"") -> bytes | None:
    """The model file's bytes, ``appended`` after them, with every initializer of its main graph whose raw data
    is at least :data:`MIN_EXTERNAL_BYTES` an external-data reference to those bytes in the file itself
    (location: the file's name, so ONNX Runtime must be told the file's folder). None when nothing would
    move, or the file's framing is not the plain one an exporter writes (one graph field, no groups)."""
    path = Path(path)
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            fields = list(_fields(data, 0, len(data)))
            graphs = [f for f in fields if f[0] == _MODEL_GRAPH]
            if len(graphs) != 1 or graphs[0][1] != _LENGTH_DELIMITED:
                return None
            parts, moved = [], 0
            for number, _, key_at, payload, end in fields:
                if number == _MODEL_GRAPH:
                    graph, moved = _graph(data, payload, end, path.name)
                    parts.append(_length_delimited(_MODEL_GRAPH, graph))
                else:
                    parts.append(bytes(data[key_at:end]))
        except _NotPlain:
            return None
    return b"".join(parts) + appended if moved else None

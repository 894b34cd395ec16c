"""The constant tensors of a frozen TensorFlow graph (a ``GraphDef`` .pb), read without
TensorFlow: a small reader of the protobuf wire format, for the few messages involved.

GraphDef.node (1) -> NodeDef: name (1), op (2), attr (5, map entries key 1 / value 2);
AttrValue.tensor (8) -> TensorProto: dtype (1), tensor_shape (2) -> dim (2) -> size (1),
tensor_content (4), or float_val (5) / int_val (7) for small tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

# TensorFlow's DataType enum values for the dtypes a frozen recogniser holds.
DTYPES = {1: np.float32, 3: np.int32, 9: np.int64}
VARINT, FIXED64, BYTES, FIXED32 = 0, 1, 2, 5


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated protobuf varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def fields(data: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of one message: ints for varints, bytes views otherwise."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _varint(data, pos)
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            value, pos = data[pos:pos + size], pos + size
        elif wire == BYTES:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield number, value


def _shape(message: memoryview) -> tuple[int, ...]:
    dims = []
    for number, dim in fields(message):
        if number == 2:
            dims.append(next((v for n, v in fields(dim) if n == 1), 0))
    return tuple(dims)


def _tensor(message: memoryview) -> np.ndarray:
    dtype, shape, content, values = None, (), None, []
    for number, value in fields(message):
        if number == 1:
            dtype = value
        elif number == 2:
            shape = _shape(value)
        elif number == 4:
            content = bytes(value)
        elif number in (5, 7):  # float_val / int_val: packed, or one value per field
            values.append(value)
    if dtype not in DTYPES:
        raise ValueError(f"unsupported TensorFlow dtype {dtype}")
    np_dtype = np.dtype(DTYPES[dtype]).newbyteorder("<")
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        array = np.frombuffer(content, dtype=np_dtype)
    elif values and isinstance(values[0], memoryview) and np_dtype.kind == "f":
        array = np.frombuffer(b"".join(bytes(v) for v in values), dtype=np_dtype)
    else:  # small int constants (shapes, axes); a single value fills the whole tensor
        array = np.array(values or [0], dtype=np_dtype)
    if array.size == 1 and count != 1:
        array = np.full(count, array[0], dtype=np_dtype)
    if array.size != count:
        raise ValueError(f"a constant of shape {shape} holds {array.size} values")
    return array.reshape(shape).astype(np_dtype.newbyteorder("="))


def read_constants(path: str | Path) -> dict[str, np.ndarray]:
    """Every ``Const`` node of the frozen graph in ``path``: name -> array."""
    data = memoryview(Path(path).read_bytes())
    constants = {}
    for number, node in fields(data):
        if number != 1:
            continue
        name = op = tensor = None
        for n, value in fields(node):
            if n == 1:
                name = bytes(value).decode()
            elif n == 2:
                op = bytes(value).decode()
            elif n == 5:
                entry = dict(fields(value))
                if bytes(entry.get(1, b"")) == b"value":
                    tensor = next((v for k, v in fields(entry[2]) if k == 8), None)
        if op == "Const" and tensor is not None:
            constants[name] = _tensor(tensor)
    return constants

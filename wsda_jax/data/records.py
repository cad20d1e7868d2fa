"""The prepared record format (ARCHITECTURE.md) and the PNG coding it relies on.

A record holds PNG bytes for the image and for every '*label' key, a uint8
presence vector for targets, and the image name:

    image: PNG (H, W, 3) uint8;  label, coarse_label, point_label: PNG (H, W) uint8
    presence: uint8 (C,);  name: str

Storing PNG keeps prepared datasets small (labels compress ~50x) and lossless;
the grain pipeline decodes with `decode_example`.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Level 3 is ~3x faster than Pillow's default 6 on photos, with files ~5% larger.
PNG_COMPRESS_LEVEL = 3


def encode_png(array: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG bytes."""
    array = np.asarray(array)
    if (
        array.dtype != np.uint8
        or array.ndim not in (2, 3)
        or array.ndim == 3
        and array.shape[-1] != 3
    ):
        raise ValueError(f"expected uint8 (H, W) or (H, W, 3), got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def decode_png(data: bytes, mode: str) -> np.ndarray:
    """PNG bytes -> uint8 array; mode 'RGB' gives (H, W, 3), mode 'L' gives (H, W)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode != mode:
            image = image.convert(mode)
        return np.asarray(image, np.uint8)


def encode_example(example: dict[str, Any]) -> dict[str, Any]:
    """Numpy example -> record: PNG bytes for 'image' and '*label', uint8 presence, str name."""
    record = {}
    for key, value in example.items():
        if key == "image":
            record[key] = encode_png(np.asarray(value, np.uint8))
        elif key.endswith("label"):
            if np.ndim(value) != 2:
                raise ValueError(f"{key}: expected (H, W), got shape {np.shape(value)}")
            record[key] = encode_png(np.asarray(value, np.uint8))
        elif key == "presence":
            record[key] = np.asarray(value, np.uint8)
        elif key == "name":
            record[key] = str(value)
        else:
            raise ValueError(f"unknown record key {key!r}")
    return record


def decode_example(record: dict[str, Any]) -> dict[str, Any]:
    """Record (as returned by a data source) -> numpy example.

    Returns image uint8 (H, W, 3), every '*label' uint8 (H, W), presence uint8 (C,)
    when present, and name as str.
    """
    example = {}
    for key, value in record.items():
        if key == "image":
            example[key] = decode_png(value, "RGB")
        elif key.endswith("label"):
            example[key] = decode_png(value, "L")
        elif key == "presence":
            example[key] = np.asarray(value, np.uint8)
        elif key == "name":
            example[key] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        else:
            raise ValueError(f"unknown record key {key!r}")
    return example


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file (bad signature)")
    chunks, offset = [], len(PNG_SIGNATURE)
    while offset + 8 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        chunks.append((kind, data[offset + 8 : offset + 8 + length]))
        offset += 12 + length
        if kind == b"IEND":
            break
    return chunks


def read_png_rgb16(data: bytes) -> np.ndarray:
    """PNG bytes of a 16-bit 3-channel image (SYNTHIA's GT/LABELS) -> uint16 (H, W, 3), RGB.

    Pillow reads such files but keeps only the high byte of each sample. PNG
    filtering works byte-wise with a stride of one pixel (6 bytes), so each byte
    position within a pixel is unfiltered independently of the others. Shifting
    every filtered row one byte to the left puts the low bytes where Pillow reads
    the high bytes; decoding the original and the shifted stream with Pillow
    gives both halves without a Python-level unfilter loop. 8-bit RGB files are
    accepted too (returned widened to uint16).
    """
    chunks = _png_chunks(data)
    if not chunks or chunks[0][0] != b"IHDR":
        raise ValueError("PNG without IHDR")
    header = chunks[0][1]
    width, height, bit_depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if color_type != 2 or bit_depth not in (8, 16):
        raise ValueError(
            f"expected an RGB PNG, got bit depth {bit_depth}, colour type {color_type}"
        )
    high = decode_png(data, "RGB").astype(np.uint16)
    if bit_depth == 8:
        return high
    if interlace:
        raise ValueError("interlaced 16-bit RGB PNGs are not supported")
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 6 * width)
    shifted = np.zeros_like(rows)
    shifted[:, 0] = rows[:, 0]  # The filter type of each row stays in place.
    shifted[:, 1:-1] = rows[:, 2:]
    shifted_png = (
        PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(shifted.tobytes(), 1))
        + _png_chunk(b"IEND", b"")
    )
    low = decode_png(shifted_png, "RGB").astype(np.uint16)
    return (high << 8) | low

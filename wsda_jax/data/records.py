"""The prepared record format (ARCHITECTURE.md) and the image coding it relies on.

A record holds the encoded image, PNG bytes for every '*label' key, a uint8
presence vector for targets, and the image name:

    image: PNG or .npy (H, W, 3) uint8;  label, coarse_label, point_label: PNG (H, W) uint8
    presence: uint8 (C,);  name: str

Both image formats are lossless. 'npy' (numpy's own array file: a short header,
then the raw bytes) needs no decoding, which makes the input pipeline several
times faster per core, at about 1.8x the disk of a PNG photo; 'png' is the compact
choice (`config.data.image_format`, docs/benchmarks.md "Input pipeline"). Labels are
always PNG: they compress ~50x and decode in well under a millisecond.
`decode_example` recognises either image format by its leading bytes.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

from wsda_jax.config_lib import IMAGE_FORMATS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_SIGNATURE = b"\x93NUMPY"
# The header `encode_npy` writes (format 1.0). np.load parses headers with
# ast.literal_eval, which CPython 3.11 breaks when threads race on it ("SystemError:
# AST constructor recursion depth mismatch", seen with grain's decode threads), so
# `decode_image` matches this one header instead.
_NPY_HEADER = re.compile(
    r"\{'descr': '\|u1', 'fortran_order': False, 'shape': \((\d+), (\d+), 3\), \} *\n"
)
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


def encode_npy(array: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> .npy bytes (numpy's header + the raw C-order bytes)."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 (H, W, 3), got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """PNG or .npy bytes (told apart by their signature) -> uint8 (H, W, 3)."""
    if data[: len(NPY_SIGNATURE)] != NPY_SIGNATURE:
        return decode_png(data, "RGB")
    (header_length,) = struct.unpack("<H", data[8:10])
    header = bytes(data[10 : 10 + header_length]).decode("latin1")
    match = _NPY_HEADER.fullmatch(header)
    if data[6:8] != b"\x01\x00" or match is None:
        raise ValueError(f"npy image: expected a uint8 (H, W, 3) array file, got {header!r}")
    height, width = int(match.group(1)), int(match.group(2))
    pixels = np.frombuffer(data, np.uint8, offset=10 + header_length)
    if pixels.size != height * width * 3:
        raise ValueError(f"npy image: {pixels.size} bytes for a {height}x{width}x3 image")
    return pixels.reshape(height, width, 3).copy()


def encode_example(example: dict[str, Any], image_format: str = "png") -> dict[str, Any]:
    """Numpy example -> record: 'image' as `image_format` ('png' or 'npy'), PNG bytes for
    '*label', uint8 presence, str name."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format={image_format!r}: expected one of {IMAGE_FORMATS}")
    encode_image = encode_npy if image_format == "npy" else encode_png
    record = {}
    for key, value in example.items():
        if key == "image":
            record[key] = encode_image(np.asarray(value, np.uint8))
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
            example[key] = decode_image(value)
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

"""Just enough PNG for the tests: decode the 8-bit RGB / RGBA, non-interlaced images QEMU and Chromium write."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

__all__ = ["Image", "decode_png", "png_rgb", "rgba_to_rgb", "same_pixels"]


@dataclass(frozen=True)
class Image:
    width: int
    height: int
    #: Bytes per pixel: 3 (RGB) or 4 (RGBA).
    channels: int
    pixels: bytes

    def rgb(self, x: int, y: int) -> tuple[int, int, int]:
        i = (y * self.width + x) * self.channels
        return self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]

    def distinct_colours(self, limit: int = 1000) -> int:
        """How many different RGB values the image holds (a blank screen has one)."""
        seen: set[bytes] = set()
        step = self.channels
        for i in range(0, len(self.pixels), step):
            seen.add(self.pixels[i : i + 3])
            if len(seen) >= limit:
                break
        return len(seen)

    def lit_fraction(self) -> float:
        """The share of pixels brighter than near-black (text on a dark screen)."""
        step = self.channels
        lit = sum(1 for i in range(0, len(self.pixels), step) if sum(self.pixels[i : i + 3]) > 96)
        return lit / (self.width * self.height)


def decode_png(data: bytes) -> Image:
    """:raise ValueError: not a PNG this decoder reads."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, chunks, header = 8, [], b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or colour not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG (depth {depth}, colour type {colour}, interlace {interlace})")
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    out = bytearray()
    previous = bytearray(stride)
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + ((left + up) >> 1)) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                predictor = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + predictor) & 0xFF
        out += line
        previous = line
    return Image(width, height, channels, bytes(out))


def rgba_to_rgb(rgba: bytes) -> bytes:
    rgb = bytearray(len(rgba) // 4 * 3)
    rgb[0::3], rgb[1::3], rgb[2::3] = rgba[0::4], rgba[1::4], rgba[2::4]
    return bytes(rgb)


def png_rgb(data: bytes) -> tuple[int, int, bytes]:
    """``(width, height, RGB bytes)`` of an 8-bit RGB or RGBA PNG."""
    image = decode_png(data)
    return image.width, image.height, image.pixels if image.channels == 3 else rgba_to_rgb(image.pixels)


def same_pixels(a: bytes, b: bytes) -> float:
    """The fraction of identical RGB pixels of two images of the same size."""
    assert len(a) == len(b)
    same = sum(1 for i in range(0, len(a), 3) if a[i : i + 3] == b[i : i + 3])
    return same / (len(a) // 3)

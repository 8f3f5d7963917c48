"""The input formats the service accepts, judged by their bytes."""

from __future__ import annotations

# The image formats the service accepts, by media type, with the Pillow decoder for each.
# Pillow can open more (EPS hands the file to Ghostscript, for one); an upload is untrusted,
# so only the common raster formats get through, at upload and again in the processors.
IMAGE_FORMATS = {
    "image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF", "image/webp": "WEBP",
    "image/bmp": "BMP", "image/tiff": "TIFF",
}

# Magic numbers of the formats the processors read. Sniffed from the bytes, never taken
# from a file name or a client's Content-Type, which cost nothing to forge.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"BM", "image/bmp"),
    (0, b"II*\x00", "image/tiff"),
    (0, b"MM\x00*", "image/tiff"),
)


def sniff_content_type(head: bytes) -> str:
    """The media type the first bytes of a file announce; application/octet-stream if unknown."""
    for offset, magic, media_type in _SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return media_type
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"mif1", b"msf1"):
            return "image/heic"
        if brand == b"qt  ":
            return "video/quicktime"
        return "video/mp4"
    return "application/octet-stream"

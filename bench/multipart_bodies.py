"""Hand-built multipart/form-data bodies (for requests no HTTP client library would send: many
parts, many fields, odd part headers). Shared by tests/test_request_limits.py and bench/attacks.py;
the tests find this folder through pytest's `pythonpath` setting (pyproject.toml)."""
from __future__ import annotations

BOUNDARY = "lim"


def multipart(parts: list[tuple[str, bytes]]) -> bytes:
    """A multipart body (boundary BOUNDARY) from (part header lines, content) pairs."""
    out = b""
    for head, content in parts:
        out += f"--{BOUNDARY}\r\n{head}\r\n\r\n".encode() + content + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def file_part(field: str, i: int, content: bytes) -> tuple[str, bytes]:
    """A file part named `field`, file name p{i}.jpg, type image/jpeg."""
    return f'Content-Disposition: form-data; name="{field}"; filename="p{i}.jpg"\r\nContent-Type: image/jpeg', content


def text_part(name: str, content: bytes = b"") -> tuple[str, bytes]:
    """A text (non-file) field."""
    return f'Content-Disposition: form-data; name="{name}"', content

"""An upload, read as it streams in: multipart/form-data parsed chunk by chunk, the audio part
written to the server's private folder under a name the server makes up.

Nothing past ``max_bytes`` of audio is ever kept, in memory or on disk: the count is checked
before each chunk is written, and once over, the rest of the body is read and thrown away (up
to :data:`DRAIN_LIMIT`) so that the client, still sending, reads the 413 instead of a reset
connection. The client's file name is used for messages only, and for a short alphanumeric
suffix (``.m4a``) that helps ffmpeg-less error messages name the format.
"""

from __future__ import annotations

import dataclasses
import os
import re
import uuid
from pathlib import Path
from typing import AsyncIterator, Optional

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from whisperjax_cli.server_protocol import ApiError

MAX_FIELDS = 64  # text parts: OpenAI's API has about a dozen
MAX_FIELD_BYTES = 64 * 1024  # one text part (a prompt is 224 tokens at most)
FORM_OVERHEAD = MAX_FIELDS * 1024  # bytes of a body besides the audio: boundaries, headers, fields
DRAIN_LIMIT = 64 << 20  # bytes read and discarded past the limit, so the client reads the 413
_SUFFIX = re.compile(r"\.[a-z0-9]{1,8}")
# Text formats in which ffmpeg follows references to other files (HLS and other playlists, DASH
# and SMIL manifests): an upload must not make the server read its own files as audio.
_REFERRING = (b"#EXT", b"FFCONCAT", b"[PLAYLIST]", b"<?XML", b"<MPD", b"<SMIL")
HEAD_BYTES = 64


@dataclasses.dataclass
class Upload:
    """A parsed form: text fields, and where the audio part was written."""

    fields: dict[str, list[str]]
    path: Optional[Path] = None  # under the server's folder; None when no file part came
    filename: str = "file"  # the client's name for it (messages only)
    size: int = 0
    head: bytes = b""  # its first bytes, to refuse what refers to other files

    def refers_to_other_files(self) -> bool:
        """True for a playlist or manifest (ffmpeg would open the files it names)."""
        start = self.head.lstrip(b"\xef\xbb\xbf \t\r\n").upper()
        return start.startswith(_REFERRING)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class _FormReader:
    """python-multipart callbacks that keep text fields and write the one file part to disk."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.upload = Upload({})
        self.too_large = False
        self._header_name, self._header_value = b"", b""
        self._disposition = b""
        self._name: Optional[str] = None
        self._data: Optional[bytearray] = None  # the text part being read
        self._fd: Optional[int] = None  # the file part being written

    def callbacks(self) -> dict:
        return {"on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end}

    def on_part_begin(self) -> None:
        self._disposition, self._name, self._data = b"", None, None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise ApiError(400, "a multipart part has no name")
        self._name = _text(options[b"name"])
        if b"filename" not in options:
            if sum(len(v) for v in self.upload.fields.values()) >= MAX_FIELDS:
                raise ApiError(400, f"too many form fields (at most {MAX_FIELDS})")
            self._data = bytearray()
            return
        if self._name != "file" or self.upload.path is not None:
            raise ApiError(400, "send one audio file, in the multipart field 'file'", param="file")
        self.upload.filename = _text(options[b"filename"]) or "file"
        suffix = os.path.splitext(self.upload.filename)[1].lower()
        name = uuid.uuid4().hex + (suffix if _SUFFIX.fullmatch(suffix) else "")
        self.upload.path = self.folder / name
        self._fd = os.open(self.upload.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._data is not None:
            if len(self._data) + end - start > MAX_FIELD_BYTES:
                raise ApiError(400, f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes",
                               param=self._name)
            self._data += data[start:end]
        elif self._fd is not None:
            self.upload.size += end - start
            if self.upload.size > self.max_bytes:
                self.too_large = True
                raise _TooLarge()
            if len(self.upload.head) < HEAD_BYTES:
                self.upload.head += data[start : start + HEAD_BYTES - len(self.upload.head)]
            os.write(self._fd, data[start:end])

    def on_part_end(self) -> None:
        if self._data is not None:
            self.upload.fields.setdefault(self._name, []).append(_text(bytes(self._data)))
            self._data = None
        self.close_file()

    def close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _TooLarge(Exception):
    pass


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "form fields must be UTF-8") from None


def too_large(max_bytes: int) -> ApiError:
    mb = max_bytes / (1 << 20)
    return ApiError(413, f"the audio file is larger than this server's limit of {mb:g} MB",
                    param="file", code="file_too_large")


async def read_upload(stream: AsyncIterator[bytes], content_type: str, content_length: Optional[int],
                      folder: Path, max_bytes: int) -> Upload:
    """Parses a multipart body from ``stream``, writing its ``file`` part into ``folder``.

    Raises:
      ApiError: 400 for a body that is not multipart/form-data or breaks its rules, 413 when
        the file part passes ``max_bytes``. Whatever was written is removed first.
    """
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise ApiError(400, "send the request as multipart/form-data (a 'file' part and text fields)")
    if content_length is not None and content_length > max_bytes + FORM_OVERHEAD + DRAIN_LIMIT:
        raise too_large(max_bytes)  # too big even to read and discard: answered at once
    reader = _FormReader(folder, max_bytes)
    parser = MultipartParser(options[b"boundary"], reader.callbacks())
    try:
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
    except _TooLarge:
        reader.close_file()
        reader.upload.remove()
        await _drain(stream)
        raise too_large(max_bytes) from None
    except FormParserError:
        reader.close_file()
        reader.upload.remove()
        raise ApiError(400, "the multipart body is malformed") from None
    except ApiError:
        reader.close_file()
        reader.upload.remove()
        await _drain(stream)
        raise
    except BaseException:
        reader.close_file()
        reader.upload.remove()
        raise
    reader.close_file()
    return reader.upload


async def _drain(stream: AsyncIterator[bytes]) -> None:
    """Reads and discards the rest of the body, up to :data:`DRAIN_LIMIT` bytes."""
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > DRAIN_LIMIT:
            return

"""Reading raw data files: encoding detection, precise error messages, skip accounting.

Every loader error is a `DataError` that names the file, the 1-based line (as an editor shows it)
and the field, so a user can open the file and fix the item. With `on_error="skip"` the loaders
count each skipped item in a `LoadReport` instead: nothing is dropped silently.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mentalglm.errors import UserError

ON_ERROR = ("raise", "skip")
# A UTF-8 Chinese character is 3 bytes; a GBK line that happens to read as UTF-8 almost never yields one.
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff]")


_LABEL_LIKE = re.compile(r"[\w/#&+.-]{1,10}")


def shown(value) -> str:
    """A value of a data file as an error message may show it: a short label-like value as it is, anything that
    could be a post (a shifted column puts one where a label belongs) as its length and a hash."""
    import hashlib

    text = str(value)
    if _LABEL_LIKE.fullmatch(text.strip() or "-") and len(text) <= 10:
        return repr(text)
    digest = hashlib.sha256(text.encode("utf-8", errors="replace")).hexdigest()[:8]
    return f"<{len(text)} characters, sha256 {digest}>"


def column_name(name: str) -> str:
    """A header cell as an error may name it (a file without its header row has a post there)."""
    return name if shown(name).startswith("'") else shown(name)


class DataError(UserError):
    """Bad input data. `reason` is short and stable (it is the skip-count key); `detail` adds the values."""

    def __init__(
        self,
        file,
        reason: str,
        *,
        line: int | None = None,
        field: str | None = None,
        detail: str = "",
        offset: int | None = None,
    ):
        self.file, self.line, self.field = str(file), line, field
        self.reason, self.detail, self.offset = reason, detail, offset
        where = self.file
        if line is not None:
            where += f", line {line}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass
class LoadReport:
    """Skipped items per (file, reason), plus loaded items per file."""

    skipped: Counter = field(default_factory=Counter)
    loaded: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # (file, reason) -> first error message

    def skip(self, err: DataError) -> None:
        key = (err.file, err.reason)
        self.skipped[key] += 1
        self.examples.setdefault(key, str(err))

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        lines = [
            f"loaded {sum(self.loaded.values())} items from {len(self.loaded)} files, skipped {self.total_skipped}"
        ]
        for (file, reason), n in sorted(self.skipped.items()):
            lines.append(f"  skipped {n:>5}  {file}: {reason}  e.g. {self.examples[(file, reason)]}")
        return "\n".join(lines)


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def handle(err: DataError, on_error: str, report: LoadReport | None) -> None:
    """Raise `err`, or count it as a skipped item."""
    if on_error == "raise":
        raise err
    if report is not None:
        report.skip(err)


def _line_of(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def _decode(raw: bytes, path) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with its byte-order mark (Excel's "Unicode text")
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as e:
            raise DataError(
                path,
                "undecodable bytes",
                line=raw[: e.start].count(b"\n\x00") + 1,
                detail=f"byte offset {e.start} is not valid UTF-16",
            ) from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _undecodable(path, raw, e.start, "utf-8", skipped_bom=3) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # Not UTF-8 as a whole: read each line with non-ASCII bytes. The file's encoding is its first such line's;
    # a line of the other encoding is refused (GB18030 would "decode" a UTF-8 line into mojibake), a line
    # neither reads is reported at its first bad byte.
    lines = raw.split(b"\n")
    kinds = [_line_encoding(line) for line in lines]
    chosen = next((k for k in kinds if k not in (None, "bad")), "utf-8")
    start = 0
    for i, (line, kind) in enumerate(zip(lines, kinds)):
        if kind == "bad":
            try:
                line.decode(chosen)
                offset = 0
            except UnicodeDecodeError as e:
                offset = e.start
            raise _undecodable(path, raw, start + offset, chosen)
        if kind is not None and kind != chosen:
            raise DataError(
                path,
                "mixed encodings",
                line=i + 1,
                detail=f"this line is {kind} but line {kinds.index(chosen) + 1} is {chosen}; save the "
                "file in one encoding (UTF-8)",
            )
        start += len(line) + 1
    return raw.decode(chosen)


def _line_encoding(line: bytes) -> str | None:
    """None for ASCII; else utf-8 or gb18030 (a line both read is UTF-8 only when it reads as Chinese), or bad."""
    if all(b < 0x80 for b in line):
        return None
    utf8, gb = _decodes(line, "utf-8"), _decodes(line, "gb18030")
    if utf8 and (not gb or _reads_as_utf8_chinese(line)):
        return "utf-8"
    return "gb18030" if gb else "bad"


def _decodes(line: bytes, encoding: str) -> bool:
    try:
        line.decode(encoding)
        return True
    except UnicodeDecodeError:
        return False


def _reads_as_utf8_chinese(line: bytes) -> bool:
    try:
        return bool(_CJK.search(line.decode("utf-8")))
    except UnicodeDecodeError:
        return False


def _undecodable(path, raw: bytes, offset: int, encoding: str, skipped_bom: int = 0) -> DataError:
    return DataError(
        path,
        "undecodable bytes",
        line=_line_of(raw, offset),
        offset=offset + skipped_bom,
        detail=f"byte offset {offset + skipped_bom} (0x{raw[offset]:02x}) is not valid {encoding}; "
        "expected UTF-8 or GB18030/GBK",
    )


def _decode_lines(raw: bytes, path, report: LoadReport | None) -> str:
    """Skip mode: decode line by line, blank out undecodable lines (kept, so line numbers hold)."""
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    lines = raw.split(b"\n")

    def ok(line, enc):
        try:
            line.decode(enc)
            return True
        except UnicodeDecodeError:
            return False

    enc = max(("utf-8", "gb18030"), key=lambda e: (sum(ok(li, e) for li in lines), e == "utf-8"))
    out = []
    for i, line in enumerate(lines):
        try:
            if enc == "gb18030" and _reads_as_utf8_chinese(line):
                # Valid GB18030 too, but only as mojibake: skipped and counted, never read as garbage.
                raise UnicodeDecodeError(enc, line, 0, 1, "a UTF-8 line in a GB18030 file")
            out.append(line.decode(enc))
        except UnicodeDecodeError as e:
            out.append("")
            err = DataError(
                path, "undecodable bytes", line=i + 1, detail=f"byte {e.start} of the line is not valid {enc}"
            )
            if report is not None:
                report.skip(err)
    return "\n".join(out)


def read_text(path, *, on_error: str = "raise", report: LoadReport | None = None, newlines: bool = True) -> str:
    """Read a text file as UTF-8 (BOM stripped) or GB18030/GBK; `newlines`: CRLF becomes LF (the loaders pass
    False and let each format split lines, so quoted fields keep their line breaks exactly as written).

    Raises DataError for an empty file, for undecodable bytes (naming line and byte offset) and for a file of
    mixed encodings; with on_error="skip" undecodable lines are blanked and counted instead.
    """
    check_on_error(on_error)
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    if not raw.strip(b"\xef\xbb\xbf \t\r\n"):
        raise DataError(path, "empty file", line=1)
    try:
        text = _decode(raw, path)
    except DataError:
        if on_error == "raise" or raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise
        text = _decode_lines(raw, path, report)
    return text.replace("\r\n", "\n") if newlines else text


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def json_lines(path, text: str, error: type[UserError]) -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-blank line of a JSONL text, any line ends; a line that is not JSON raises
    `error` naming the file, line and column."""
    import json

    from mentalglm.data.formats import LINE_END

    for lineno, line in enumerate(LINE_END.split(text), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from None
        if SURROGATE_ESCAPE.search(line):  # "\ud800" alone is valid JSON but no text: it fails every later write
            try:
                json.dumps(value, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise error(
                    f"{path}:{lineno}: a lone surrogate escape (\\ud800-\\udfff without its pair): not text"
                ) from None
        yield lineno, value

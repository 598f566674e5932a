"""Reading raw data files: encoding detection, precise error messages, skip accounting.

Every loader error is a `DataError` that names the file, the 1-based line (as an editor shows it)
and the field, so a user can open the file and fix the item. With `on_error="skip"` the loaders
count each skipped item in a `LoadReport` instead: nothing is dropped silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ON_ERROR = ("raise", "skip")


class DataError(ValueError):
    """Bad input data. `reason` is short and stable (it is the skip-count key); `detail` adds the values."""

    def __init__(self, file, reason: str, *, line: int | None = None, field: str | None = None,
                 detail: str = "", offset: int | None = None):
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
        lines = [f"loaded {sum(self.loaded.values())} items from {len(self.loaded)} files, "
                 f"skipped {self.total_skipped}"]
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
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _undecodable(path, raw, e.start, "utf-8", skipped_bom=3) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        utf8_err = e
    # Whole earlier lines with non-ASCII text that read as UTF-8 mean a UTF-8 file with a bad byte
    # (GB18030 would "decode" it into garbage), so report the byte. A GBK line almost never reads as
    # UTF-8 to its end, though a few GBK bytes can (hence whole lines, not a prefix).
    line_start = raw.rfind(b"\n", 0, utf8_err.start) + 1
    if any(b >= 0x80 for b in raw[:line_start]):
        raise _undecodable(path, raw, utf8_err.start, "utf-8") from None
    try:
        return raw.decode("gb18030")
    except UnicodeDecodeError as e:
        # Neither fits: the encoding that read further is the likelier intent.
        start, enc = max((utf8_err.start, "utf-8"), (e.start, "gb18030"))
        raise _undecodable(path, raw, start, enc) from None


def _undecodable(path, raw: bytes, offset: int, encoding: str, skipped_bom: int = 0) -> DataError:
    return DataError(path, "undecodable bytes", line=_line_of(raw, offset), offset=offset + skipped_bom,
                     detail=f"byte offset {offset + skipped_bom} (0x{raw[offset]:02x}) is not valid {encoding}; "
                            "expected UTF-8 or GB18030/GBK")


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
            out.append(line.decode(enc))
        except UnicodeDecodeError as e:
            out.append("")
            err = DataError(path, "undecodable bytes", line=i + 1,
                            detail=f"byte {e.start} of the line is not valid {enc}")
            if report is not None:
                report.skip(err)
    return "\n".join(out)


def read_text(path, *, on_error: str = "raise", report: LoadReport | None = None) -> str:
    """Read a text file as UTF-8 (BOM stripped) or GB18030/GBK, with LF line ends.

    Raises DataError for an empty file and for undecodable bytes (naming line and byte offset);
    with on_error="skip" undecodable lines are blanked and counted instead.
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
        if on_error == "raise":
            raise
        text = _decode_lines(raw, path, report)
    return text.replace("\r\n", "\n")

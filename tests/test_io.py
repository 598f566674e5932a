import pytest

from mentalglm.data.io import DataError, LoadReport, read_text


def write(tmp_path, data: bytes, name="f.tsv"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_utf8_crlf_is_normalised(tmp_path):
    path = write(tmp_path, "id\tlabel\r\n1\t全角，文字\r\n".encode())
    assert read_text(path) == "id\tlabel\n1\t全角，文字\n"


def test_utf8_bom_is_stripped(tmp_path):
    path = write(tmp_path, b"\xef\xbb\xbf" + "内容\n好\n".encode())
    text = read_text(path)
    assert text == "内容\n好\n" and not text.startswith("\ufeff")


@pytest.mark.parametrize("encoding", ["gbk", "gb18030"])
def test_gbk_and_gb18030(tmp_path, encoding):
    text = "0\t1\t今天有点难过，压力好大\r\n1\t0\t半夜醒来不想活了\r\n"
    assert read_text(write(tmp_path, text.encode(encoding))) == text.replace("\r\n", "\n")


def test_gb18030_only_characters(tmp_path):
    text = "1\t0\t罕见字𠀀€\n"
    assert read_text(write(tmp_path, text.encode("gb18030"))) == text


def test_gbk_whose_first_bytes_are_valid_utf8(tmp_path):
    # "夜" in GBK is b"\xd2\xb9", a valid UTF-8 sequence: one stray match must not make it UTF-8.
    text = "0\t1\t半夜睡不着，压力很大\n1\t0\t一个人想结束生命\n"
    assert read_text(write(tmp_path, text.encode("gbk"))) == text


@pytest.mark.parametrize("data", [b"", b"\n\r\n  \n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\r\n"])
def test_empty_file(tmp_path, data):
    path = write(tmp_path, data, "empty.tsv")
    with pytest.raises(DataError, match="empty file") as e:
        read_text(path)
    assert "empty.tsv" in str(e.value)


def test_bad_byte_in_utf8_file_names_line_and_offset(tmp_path):
    data = "内容\n第一行\n".encode() + b"bad \xff byte\n" + "最后\n".encode()
    path = write(tmp_path, data, "bad.tsv")
    with pytest.raises(DataError) as e:
        read_text(path)
    msg = str(e.value)
    offset = data.index(b"\xff")
    assert "bad.tsv" in msg and "line 3" in msg and f"byte offset {offset}" in msg
    assert e.value.line == 3 and e.value.offset == offset


def test_bytes_invalid_in_both_encodings(tmp_path):
    path = write(tmp_path, b"abc\ndef\n\xff\xfe\n", "both.txt")
    with pytest.raises(DataError, match="undecodable bytes") as e:
        read_text(path)
    assert "both.txt" in str(e.value) and "line 3" in str(e.value)


def test_bad_byte_after_bom_offset_counts_the_bom(tmp_path):
    data = b"\xef\xbb\xbf" + "头\n".encode() + b"x\xff\n"
    with pytest.raises(DataError) as e:
        read_text(write(tmp_path, data))
    assert e.value.offset == data.index(b"\xff") and e.value.line == 2


def test_skip_mode_blanks_bad_lines_and_counts_them(tmp_path):
    data = "头\n好的\n".encode() + b"x\xff\n" + "还好\n".encode()
    path = write(tmp_path, data, "skip.tsv")
    report = LoadReport()
    text = read_text(path, on_error="skip", report=report)
    assert text.split("\n")[:4] == ["头", "好的", "", "还好"]  # line numbers still hold
    assert report.total_skipped == 1
    assert report.skipped[(str(path), "undecodable bytes")] == 1


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_text(tmp_path / "nope.csv")


def test_bad_on_error_value(tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        read_text(write(tmp_path, b"x\n"), on_error="ignore")


def test_data_error_message_names_file_line_field():
    err = DataError("a/b.tsv", "label outside the label set", line=7, field="label", detail="got '2'")
    assert str(err) == "a/b.tsv, line 7, field 'label': label outside the label set (got '2')"
    assert isinstance(err, ValueError)


def test_load_report_summary():
    report = LoadReport()
    for line in (3, 9):
        report.skip(DataError("x.tsv", "empty post", line=line, field="comment"))
    report.skip(DataError("y.csv", "malformed line", line=2, field="columns"))
    report.loaded["x.tsv"] += 10
    assert report.total_skipped == 3
    summary = report.summary()
    assert "skipped 3" in summary and "x.tsv: empty post" in summary and "line 3" in summary
    assert "y.csv: malformed line" in summary


def test_mixed_gbk_and_utf8_lines_are_refused_not_turned_into_mojibake(tmp_path):
    data = (
        "0\t1\t半夜睡不着\n1\t0\t压力很大\n".encode("gbk")
        + "1\t0\t一个人想结束生命\n".encode()
        + "0\t1\t心情低落\n".encode("gbk")
    )
    path = write(tmp_path, data, "mixed.tsv")
    with pytest.raises(DataError, match="mixed encodings") as e:
        read_text(path)
    assert e.value.line == 3 and "line 1 is gb18030" in str(e.value)
    report = LoadReport()
    text = read_text(path, on_error="skip", report=report)  # skip mode: the minority line is counted, not kept
    assert text.split("\n")[:4] == ["0\t1\t半夜睡不着", "1\t0\t压力很大", "", "0\t1\t心情低落"]
    assert report.total_skipped == 1


def test_utf16_with_bom_is_read(tmp_path):
    text = "id\tlabel\tcomment\r\n1\t0\t好累\r\n"
    assert read_text(write(tmp_path, text.encode("utf-16"))) == text.replace("\r\n", "\n")


def test_newlines_kept_as_written_for_the_loaders(tmp_path):
    raw = 'query,answer\r\n"line one\r\nline two",x\r\n'
    assert read_text(write(tmp_path, raw.encode()), newlines=False) == raw

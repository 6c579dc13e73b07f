"""tar_samples parses plain ustar headers itself and hands any other header to tarfile: every tar
format (ustar with a prefix, GNU long names, pax) gives the same samples, and a tar cut short or
garbled anywhere ends exactly as tarfile alone would end it."""

from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.data import reader
from pipeline.data.reader import tar_samples

LONG = "d" * 80 + "/" + "b" * 60  # over 100 characters: a ustar prefix, a GNU or pax long name
MEMBERS = [
    ("a.png", b"A" * 700),
    ("a.cls", b"1"),
    ("folder/", None),
    (f"{LONG}.png", b"B" * 513),
    (f"{LONG}.cls", b"2"),
    ("c.PNG", b""),
    ("é.png", b"E" * 512),
]
SAMPLES = [
    ("a", {"png": b"A" * 700, "cls": b"1"}),
    (LONG, {"png": b"B" * 513, "cls": b"2"}),
    ("c", {"png": b""}),
    ("é", {"png": b"E" * 512}),
]


def _tar(form: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=form) as archive:
        for name, data in MEMBERS:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _read(data: bytes) -> tuple[list[tuple[str, dict]], str]:
    """The samples read before the end, and how it ended ("" at the end blocks)."""
    samples = []
    try:
        for sample in tar_samples(io.BytesIO(data), 1 << 20):
            samples.append((sample.key, sample.members))
    except (tarfile.TarError, EOFError) as err:
        return samples, f"{type(err).__name__}: {err}"
    return samples, ""


FORMATS = [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]


@pytest.mark.parametrize("form", FORMATS)
def test_every_tar_format_gives_the_same_samples(form):
    assert _read(_tar(form)) == (SAMPLES, "")


@pytest.mark.parametrize("form", FORMATS)
def test_a_cut_or_garbled_tar_ends_as_tarfile_alone_ends_it(form, monkeypatch):
    data = _tar(form)
    cases = [data[:cut] for cut in range(0, len(data), 97)]
    header = 1536  # a.cls's: a byte of its name flipped, then of its mode (checksum fixed)
    cases += [data[:header] + b"b" + data[header + 1 :], data[:2048] + b"x" * 512]
    mode = bytearray(data[header : header + 512])
    mode[100:108], mode[148:156] = b"0 00644\0", b" " * 8
    mode[148:156] = b"%06o\0 " % sum(mode)
    cases.append(data[:header] + bytes(mode) + data[header + 512 :])
    fast = [_read(case) for case in cases]
    monkeypatch.setattr(reader, "_plain_header", lambda block: None)  # every header to tarfile
    assert fast == [_read(case) for case in cases]
    assert any(end.startswith("ReadError: archive ends without") for _, end in fast)
    assert any(end == "ReadError: unexpected end of data" for _, end in fast)
    assert fast[-3][1].endswith("(InvalidHeaderError: bad checksum)")
    assert fast[-1][1].endswith("(InvalidHeaderError: invalid header)")

"""Fuzzing the parsers of what storage holds (issue 24): the tar reader and the `_info.json` manifest parser.

Whoever writes the bucket writes these bytes. Every generated input (truncated headers, wrong checksums, huge,
negative and base-256 sizes, PAX and GNU long-name records, odd and non-UTF-8 names, deeply nested or oversized
JSON, wrong types) is either parsed or refused with the platform's own error: a BadShardError/ShortShardError
(data/faults.py, what the loader counts as a bad shard) or a ManifestError; decoding a parsed sample fails only
with SAMPLE_ERRORS (a bad sample). Never another exception, and never more memory than a bound.

Deterministic for CI: `derandomize=True` (examples derived from each test's source, no example database).
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
import tracemalloc
from pathlib import Path
from typing import BinaryIO

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaformer_platform.data.faults import SAMPLE_ERRORS, BadShardError, ShortShardError
from metaformer_platform.data.manifest import ManifestError, load_manifest, parse_manifest
from metaformer_platform.data.reader import count_samples, decode_label, iter_shard
from metaformer_platform.storage.files import LocalStore

FUZZ = settings(
    derandomize=True, database=None, max_examples=150, deadline=None, suppress_health_check=list(HealthCheck)
)
# The reader holds one 16 MiB window of a streamed shard plus a member's copy; nothing else in these inputs
# (all under 100 KB) may need more, whatever sizes their headers declare (up to 8 GiB, or any in base-256).
MEMORY_BOUND = 40 << 20
MAX_MEMBER = 1 << 16
SCRATCH = Path(tempfile.mkdtemp(prefix="fuzz-parsers-"))


class _Unsized(io.RawIOBase):
    """A stream whose length is not known (no fileno, no length): only max_member_bytes bounds a member."""

    def __init__(self, data: bytes):
        self.inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        return self.inner.readinto(buffer)


class _Source:
    """A ShardSource over one shard's bytes, opened the way the loader meets shards."""

    def __init__(self, data: bytes, how: str):
        self.data, self.how = data, how
        if how == "file":
            (SCRATCH / "s.tar").write_bytes(data)

    def open(self, name: str) -> BinaryIO:
        if self.how == "memory":  # the prefetcher's shards
            return io.BytesIO(self.data)
        if self.how == "file":  # a local shard
            return LocalStore(SCRATCH).open("s.tar")
        return io.BufferedReader(_Unsized(self.data))  # like an object store body without a length

    def describe(self, name: str) -> str:
        return f"fuzz/{name}"


def _bounded(run) -> None:  # type: ignore[no-untyped-def]
    tracemalloc.start()
    try:
        run()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"peak {peak} bytes"


def _read_all(data: bytes, how: str, stop: int | None) -> None:
    source = _Source(data, how)

    def run() -> None:
        try:
            for sample in iter_shard(source, "s.tar", 0, stop, max_member_bytes=MAX_MEMBER):
                assert all(isinstance(v, bytes) and len(v) <= MAX_MEMBER for v in sample.files.values())
                try:
                    decode_label(sample)
                except SAMPLE_ERRORS:
                    pass  # a bad sample: counted by the loader
            count_samples(source, "s.tar", max_member_bytes=MAX_MEMBER)
        except (BadShardError, ShortShardError) as err:
            assert "fuzz/s.tar" in str(err)  # names the shard

    _bounded(run)


# --- tar inputs -----------------------------------------------------------------------------------------------

NAMES = st.one_of(
    st.binary(min_size=0, max_size=100),  # any bytes, non-UTF-8 included
    st.text(min_size=1, max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")[:100]),
    st.sampled_from([b"a.jpg", b"a.cls", b"../../etc/x.jpg", b"/abs.cls", b".hidden", b"k.", b"\xff\xfe.jpg"]),
)
SIZES = st.one_of(
    st.integers(0, 4096).map(lambda n: b"%011o\0" % n),
    st.sampled_from([b"77777777777\0", b"-0000000001\0", b"+7\0", b"1_0\0", b"zz\0", b"", b"\0" * 12, b"  12  \0"]),
    st.binary(min_size=12, max_size=12).map(lambda b: b"\x80" + b[1:]),  # base-256, positive
    st.binary(min_size=12, max_size=12).map(lambda b: b"\xff" + b[1:]),  # base-256, negative
)
TYPES = st.sampled_from([b"0", b"\0", b"5", b"1", b"2", b"L", b"x", b"g", b"K", b"S", b"7", b"?"])
MAGICS = st.sampled_from([b"ustar\x0000", b"ustar  \x00", b"\0" * 8, b"garbage!"])


def _checksummed(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """One header block with fields drawn apart (a right or wrong checksum), then data of any length."""
    block = bytearray(512)
    name = draw(NAMES)
    block[: len(name)] = name
    size = draw(SIZES)[:12]
    block[124 : 124 + len(size)] = size
    block[156:157] = draw(TYPES)
    block[257:265] = draw(MAGICS)
    prefix = draw(st.binary(max_size=20))
    block[345 : 345 + len(prefix)] = prefix
    header = _checksummed(block) if draw(st.booleans()) else bytes(block)
    if block[156:157] == b"x":  # a PAX header: records that may lie about their length
        record = draw(st.one_of(
            st.binary(max_size=64),
            st.sampled_from([b"0 path=x\n", b"3 a\n", b"99999999999 path=y\n", b"abc path=z\n", b"12 path=\xff\xfe\n"]),
        ))
        return header + record + b"\0" * (-len(record) % 512)
    return header + draw(st.binary(max_size=1500))


def _valid_tar(fmt: int, members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@st.composite
def mutated_tars(draw: st.DrawFn) -> bytes:
    """A tar tarfile writes (ustar, GNU or PAX; long and odd names), then cut, flipped or overwritten."""
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    long_ok = fmt != tarfile.USTAR_FORMAT
    names = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), min_size=1,
                    max_size=150 if long_ok else 90)
    members = draw(st.lists(st.tuples(names, st.binary(max_size=700)), min_size=1, max_size=4))
    try:
        data = bytearray(_valid_tar(fmt, members))
    except (ValueError, UnicodeError):  # a name this format cannot hold
        data = bytearray(_valid_tar(tarfile.PAX_FORMAT, [("k.cls", b"1")]))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data) - 1))
        patch = draw(st.one_of(st.binary(min_size=1, max_size=16), SIZES))
        data[at : at + len(patch)] = patch
    return bytes(data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)


READS = st.sampled_from(["memory", "file", "unsized"])
STOPS = st.one_of(st.none(), st.integers(0, 6))


@FUZZ
@given(data=st.lists(headers(), min_size=1, max_size=4).map(b"".join), how=READS, stop=STOPS)
def test_tar_reader_handcrafted_headers(data: bytes, how: str, stop: int | None) -> None:
    _read_all(data, how, stop)


@FUZZ
@given(data=mutated_tars(), how=READS, stop=STOPS)
def test_tar_reader_mutated_tars(data: bytes, how: str, stop: int | None) -> None:
    _read_all(data, how, stop)


@FUZZ
@given(data=st.binary(max_size=3000), how=READS)
def test_tar_reader_random_bytes(data: bytes, how: str) -> None:
    _read_all(data, how, None)


def test_a_declared_8gib_member_is_refused_from_its_header_in_every_read() -> None:
    """The fuzzers' worst case, pinned: the header says 8 GiB - 1, the shard holds one block."""
    info = tarfile.TarInfo("big.jpg")
    info.size = 8 * 2**30 - 1
    data = info.tobuf(tarfile.USTAR_FORMAT) + b"x" * 512
    for how in ("memory", "file", "unsized"):
        refused: list[BaseException] = []
        _bounded(lambda how=how, refused=refused: refused.extend(_errors_of(_Source(data, how))))
        assert len(refused) == 1 and isinstance(refused[0], BadShardError), (how, refused)
        assert "unexpected end of data" in str(refused[0])


def _errors_of(source: _Source) -> list[BaseException]:
    try:
        list(iter_shard(source, "s.tar", max_member_bytes=MAX_MEMBER))
    except BadShardError as err:
        return [err]
    return []


# --- manifest inputs ------------------------------------------------------------------------------------------

STORE = LocalStore(SCRATCH)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
VALID = {
    "name": "x", "format": "metaformer-wds", "version": 1, "num_classes": 2, "class_names": ["a", "b"],
    "splits": {"train": {"name": "train", "num_samples": 3, "filenames": ["train-000000.tar", "train-000001.tar"],
                         "shard_lengths": [1, 2], "shard_sha256": ["0" * 64, "1" * 64], "shard_bytes": [10, 20]}},
    "extra": {"seed": 0},
}
FIELDS = ["name", "num_classes", "class_names", "splits", "extra"]
SPLIT_FIELDS = ["name", "num_samples", "filenames", "shard_lengths", "shard_sha256", "shard_bytes"]


@st.composite
def wrong_types(draw: st.DrawFn) -> bytes:
    """The valid manifest with some fields (top level or of the split) replaced by any JSON value, or dropped."""
    body = json.loads(json.dumps(VALID))
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=2)):
        body[key] = draw(JSON_VALUES)
    split = body["splits"].get("train") if isinstance(body["splits"], dict) else None
    if isinstance(split, dict):
        for key in draw(st.lists(st.sampled_from(SPLIT_FIELDS), max_size=3)):
            if draw(st.booleans()):
                split.pop(key, None)
            else:
                split[key] = draw(JSON_VALUES)
    return json.dumps(body).encode()


@st.composite
def mangled_text(draw: st.DrawFn) -> bytes:
    """The valid manifest's text, cut or with bytes overwritten (non-UTF-8 included)."""
    text = bytearray(json.dumps(VALID).encode())
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text) - 1))
        patch = draw(st.binary(min_size=1, max_size=6))
        text[at : at + len(patch)] = patch
    return bytes(text[: draw(st.integers(0, len(text)))])


NESTED = st.builds(
    lambda opener, depth, closed: opener * depth + (opener.translate(bytes.maketrans(b"[{", b"]}")) * depth
                                                    if closed and opener == b"[" else b""),
    st.sampled_from([b"[", b'{"a":', b'{"splits":']), st.integers(1, 100_000), st.booleans(),
)
HUGE_NUMBERS = st.sampled_from([b'{"num_classes": 1' + b"0" * 5000 + b"}", b'{"x": 1e99999}', b"-" * 10])
MANIFESTS = st.one_of(
    wrong_types(), mangled_text(), NESTED, HUGE_NUMBERS, st.binary(max_size=200),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
)


def _parse(data: bytes) -> None:
    def run() -> None:
        try:
            manifest = parse_manifest(data, STORE)
        except ManifestError as err:
            assert "_info.json" in str(err)  # names the file
            return
        for split in manifest.splits.values():  # what parses is what the loader can use
            assert len(split.filenames) == len(split.shard_lengths) > 0
            assert split.num_samples == sum(split.shard_lengths)

    _bounded(run)


@FUZZ
@given(data=MANIFESTS)
def test_manifest_parser(data: bytes) -> None:
    _parse(data)


@settings(FUZZ, max_examples=20)
@given(data=MANIFESTS)
def test_manifest_loader_from_storage(data: bytes) -> None:
    """The same inputs read from storage by `load_manifest` (the size cap and the read path), file checks off."""
    (SCRATCH / "_info.json").write_bytes(data)
    try:
        load_manifest(SCRATCH, check_files=False)
    except ManifestError:
        pass

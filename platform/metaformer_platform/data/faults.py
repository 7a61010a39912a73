"""Bad input met while reading shards: what counts as a fault, how it is counted, and when it is fatal.

A fault is a sample the loader could not produce from the bytes it read: its shard is missing, is not a
tar (random bytes), ends early (truncated, or fewer samples than the manifest lists), declares a member
larger than the bytes left in it (truncated) or than `data.max_member_bytes` ("oversized"), both refused
from the header before anything is allocated for the member, or the sample's image does not decode or its `.cls` is not a label. Faults are skipped and counted per shard
(`FaultStats`); past `max_bad_fraction` of a rank's samples in one epoch the loader raises
`DataFaultError`, naming the bad shards. Credentials, a missing bucket or an unreachable endpoint are not
faults: they are `S3AccessError`s, raised at once, because they would fail every shard alike.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image

__all__ = [
    "DEFAULT_MAX_MEMBER_BYTES",
    "IGNORE_LABEL",
    "BadShardError",
    "DataFaultError",
    "FaultCheckpointing",
    "FaultCounting",
    "FaultStats",
    "OversizedMemberError",
    "ShortShardError",
    "SHARD_ERRORS",
    "SAMPLE_ERRORS",
    "shard_fault_kind",
]

# The label of a sample that stands in for a bad one in evaluation batches (drop_last=False): torch's
# CrossEntropyLoss ignores it by default, and counting `labels >= 0` counts only real samples.
IGNORE_LABEL = -100
# The largest tar member the reader copies out (`data.max_member_bytes`): an ImageNet JPEG is about 110 KB, the
# largest a few MB. A header may declare up to 8 GiB (or, base-256, any size): it is never trusted for an allocation.
DEFAULT_MAX_MEMBER_BYTES = 64 << 20


@runtime_checkable
class FaultCounting(Protocol):
    """A loader that counts the samples it skipped (``ShardLoader``). Loaders injected into the Trainer or an
    evaluation (benchmarks' in-memory batches) need not: they skip nothing."""

    def fault_stats(self) -> dict[str, Any]:
        """{"skipped_samples": n, "bad_shards": {shard: {"skipped": n, "kinds": {kind: n}}}} of this rank."""
        ...


@runtime_checkable
class FaultCheckpointing(FaultCounting, Protocol):
    """A fault-counting loader whose counts go into a checkpoint per rank and come back on resume."""

    def fault_state(self) -> dict[str, Any]:
        """This rank's counts, as stored with a checkpoint."""
        ...

    def load_fault_state(self, state: dict[str, Any]) -> None:
        """Restore ``fault_state()``."""
        ...


class DataFaultError(ValueError):
    """More of the data was unreadable than `max_bad_fraction` allows; `bad_shards` names the shards."""

    def __init__(self, message: str, bad_shards: Iterable[str] = ()):
        super().__init__(message)
        self.bad_shards = tuple(bad_shards)


class ShortShardError(RuntimeError):
    """A shard holds fewer samples than its manifest lists."""


class BadShardError(tarfile.ReadError):
    """The tar reader refused a shard (not a tar, cut short, a header that cannot be right); the message names
    the shard. Every refusal of the reader is one of these (or a ShortShardError): nothing else escapes it."""


class OversizedMemberError(BadShardError):
    """A GNU long name or PAX header record larger than any tar writer makes: refused from its header, before
    anything is allocated for it. (A member larger than `data.max_member_bytes` only makes its sample bad; one
    larger than what is left of the shard is a truncated shard.)"""


# What reading one shard may raise for a shard that is bad (not for a refused or unreachable storage:
# S3AccessError is a ValueError and is not listed). OSError covers a missing file (FileNotFoundError),
# an S3 object that is gone, and a read that kept breaking.
SHARD_ERRORS: tuple[type[BaseException], ...] = (OSError, tarfile.TarError, EOFError, ShortShardError)
# What decoding one sample's bytes may raise: PIL raises OSError (truncated, unidentified), SyntaxError
# and ValueError for broken images; int() a ValueError for a bad .cls; a missing member a RuntimeError.
# A decompression bomb (more pixels than PIL's MAX_IMAGE_PIXELS) is a bad sample too: PIL raises
# DecompressionBombError past twice the limit and only warns below it, which decode_image turns into an error.
SAMPLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, RuntimeError, EOFError, Image.DecompressionBombError, Image.DecompressionBombWarning,
)


def shard_fault_kind(err: BaseException) -> str:
    """A short name for why a shard could not be read (the metric's and the log line's vocabulary)."""
    if isinstance(err, FileNotFoundError):
        return "missing"
    if isinstance(err, ShortShardError):
        return "short"
    if isinstance(err, OversizedMemberError):
        return "oversized"
    if isinstance(err, tarfile.TarError | EOFError):
        return "not_a_tar"
    return "read_error"


@dataclass
class FaultStats:
    """Samples skipped, per shard and per kind ("missing", "not_a_tar", "short", "oversized", "read_error",
    "bad_image", "bad_label"), plus the first message seen for each shard."""

    shards: dict[str, dict[str, int]] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)

    def add(self, shard: str, kind: str, count: int = 1, detail: str = "") -> bool:
        """Count `count` skipped samples of `shard`; True when the shard was not known to be bad before."""
        new = shard not in self.shards
        kinds = self.shards.setdefault(shard, {})
        kinds[kind] = kinds.get(kind, 0) + count
        if new:
            self.details[shard] = detail
        return new

    @property
    def skipped_samples(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.shards.values())

    @property
    def bad_shards(self) -> list[str]:
        return sorted(self.shards)

    def as_dict(self) -> dict[str, object]:
        """{"skipped_samples": n, "bad_shards": {shard: {"skipped": n, "kinds": {kind: n}}}}."""
        return {
            "skipped_samples": self.skipped_samples,
            "bad_shards": {
                shard: {"skipped": sum(kinds.values()), "kinds": dict(kinds)}
                for shard, kinds in sorted(self.shards.items())
            },
        }


def describe_shards(shards: Mapping[str, Mapping[str, int]], limit: int = 10) -> str:
    """'a.tar (3 bad_image), b.tar (10 missing)', at most `limit` shards named."""
    parts = [
        f"{name} ({', '.join(f'{n} {kind}' for kind, n in sorted(kinds.items()))})"
        for name, kinds in sorted(shards.items())[:limit]
    ]
    more = len(shards) - limit
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")

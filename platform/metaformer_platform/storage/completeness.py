"""The one completeness rule, for checkpoints and fetched weights, local or on S3.

A folder is complete when its marker is there and every file the marker lists is there with the listed size
and, where the marker records one, the listed sha256: checked on every local folder (a remote one is checked
on the local copy it is fetched into, before anything reads it), so a file changed after the marker was written
(same size, other bytes) is never loaded.
``COMPLETE`` is the marker a checkpoint's rank 0 writes last (see ``training/checkpoint.py``); the weights
cache writes ``FETCHED`` in the same format into each folder it downloads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

from metaformer_platform.storage.files import list_files, read_bytes
from metaformer_platform.storage.location import Location, LocationLike

__all__ = ["COMPLETE_MARKER", "file_sha256", "incomplete_reason", "is_complete", "marker_text", "missing_files"]

COMPLETE_MARKER = "COMPLETE"


def file_sha256(path: str) -> str:
    """sha256 (hex) of a local file, streamed."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def marker_text(parts: Iterable[Mapping[str, int]], sha256: Mapping[str, str] | None = None) -> str:
    """A marker listing the files of ``parts`` (each rank's name -> size) and their ``sha256`` digests. A name
    two parts list with different sizes (two ranks wrote it; the last upload wins) is listed without a size:
    only its presence is certain (callers leave out the digest of such a name too)."""
    files: dict[str, int | None] = {}
    for part in parts:
        for name, size in part.items():
            files[name] = size if files.get(name, size) == size else None
    body: dict[str, object] = {"files": dict(sorted(files.items()))}
    if sha256:
        body["sha256"] = dict(sorted(sha256.items()))
    return json.dumps(body, indent=0)


def missing_files(text: str, present: Mapping[str, int]) -> list[str]:
    """Files the marker ``text`` lists that are absent from ``present`` or of another size (``name (size)``)."""
    try:
        listed = json.loads(text)["files"]
        assert isinstance(listed, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        return ["the marker (unreadable)"]
    return [
        name if name not in present else f"{name} ({present[name]} of {size} bytes)"
        for name, size in sorted(listed.items())
        if name not in present or (size is not None and present[name] != size)
    ]


def incomplete_reason(location: LocationLike, *, marker: str = COMPLETE_MARKER, verify_sha256: bool = True) -> str | None:
    """Why the folder at ``location`` is not complete by ``marker`` (None when it is). One listing, one read;
    on a local folder (unless ``verify_sha256=False``) every file the marker records a sha256 for is hashed."""
    loc = Location.parse(location)
    present = list_files(loc)
    if marker not in present:
        return f"no {marker} marker"
    present.pop(marker)
    text = read_bytes(loc.join(marker)).decode(errors="replace")
    missing = missing_files(text, present)
    if missing:
        return f"{marker} lists files that are missing or short: {', '.join(missing[:5])}"
    if verify_sha256 and not loc.remote:
        recorded = json.loads(text).get("sha256") or {}
        if not isinstance(recorded, dict):
            return f"{marker} is unreadable (its sha256 entry is not a mapping)"
        # Only names the listing holds are opened: the marker may come from someone else.
        bad = [n for n, digest in sorted(recorded.items())
               if n not in present or file_sha256(str(loc.path / n)) != digest]
        if bad:
            return (
                f"{', '.join(bad[:5])} changed after the folder was written: its sha256 is not the one {marker} "
                "records (a corrupted copy, or a file replaced by someone else); use an intact copy"
            )
    return None


def is_complete(location: LocationLike, *, marker: str = COMPLETE_MARKER) -> bool:
    """The marker is there and every file it lists is there with its size (and, locally, its sha256)."""
    return incomplete_reason(location, marker=marker) is None

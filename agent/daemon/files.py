"""Small file helpers shared by records, manifests and staging files."""
from __future__ import annotations

import json
import os
from typing import Any, Iterator


def json_files(directory: str) -> Iterator[tuple[str, str]]:
    """(file name, path) of every ``*.json`` in ``directory``, sorted; a
    ``*.tmp`` (a write that never reached its rename) is removed."""
    for fn in sorted(os.listdir(directory)):
        path = os.path.join(directory, fn)
        if fn.endswith(".tmp"):
            os.unlink(path)
        elif fn.endswith(".json"):
            yield fn, path


def fsync_dir(path: str) -> None:
    """Make a create, rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, doc: Any, *, sync_dir: bool = False) -> None:
    """tmp + fsync + rename: a reader sees the old document or the new one.
    ``sync_dir`` also makes a new name durable (a rewrite replaces a file
    that already is)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(os.path.dirname(path))

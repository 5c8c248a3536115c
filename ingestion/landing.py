"""Write JSON-lines files into a landing folder so that a reader never sees half a file.

Every file is written under a hidden temporary name in the same folder (`.<name>.tmp`: the ingestion
job skips dot files and only picks `*.jsonl` / `*.jsonl.gz`), flushed and fsynced, and then given its
final name with a no-clobber link, which is atomic on one filesystem. Final names are
`<prefix>-<seq:06d>.jsonl[.gz]`; `seq` continues after the highest one already in the folder, so names
sort in creation order and a second writer with the same prefix never overwrites (or reuses the name of)
a file the ingestion job may already have read.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> with LandingWriter(d, prefix="demo", lines_per_file=2) as w:
...     for i in range(3):
...         w.write_event({"event_id": str(i), "ts": 1, "user_id": 1, "item_id": 1, "action": "click"})
>>> [p.name for p in w.files]
['demo-000001.jsonl', 'demo-000002.jsonl']
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np


class LandingWriter:
    """Streams lines into numbered files of at most `lines_per_file` lines each (bounded memory)."""

    def __init__(self, folder: str | Path, prefix: str = "events", lines_per_file: int = 100_000,
                 gzip_files: bool = False, fsync: bool = True):
        if lines_per_file < 1:
            raise ValueError("lines_per_file must be >= 1")
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", prefix):
            raise ValueError(f"prefix {prefix!r}: use letters, digits, '_', '.', '-' (no leading dot)")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.lines_per_file = lines_per_file
        self.suffix = ".jsonl.gz" if gzip_files else ".jsonl"
        self.fsync = fsync
        self.files: list[Path] = []
        self.lines_written = 0
        self._seq = self._last_seq()
        self._raw: BinaryIO | None = None
        self._out: BinaryIO | None = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._lines_in_file = 0

    def _last_seq(self) -> int:
        pattern = re.compile(rf"{re.escape(self.prefix)}-(\d+)\.jsonl(\.gz)?")
        seqs = [int(m.group(1)) for p in self.folder.iterdir() if (m := pattern.fullmatch(p.name))]
        return max(seqs, default=0)

    # -- writing ----------------------------------------------------------------------------
    def write_event(self, event: dict) -> None:
        self.write_line(json.dumps(event, separators=(",", ":")))

    def write_events(self, events: Iterable[dict]) -> None:
        for event in events:
            self.write_event(event)

    def write_line(self, line: str) -> None:
        """One line without its newline (malformed content is allowed: simulators write it on purpose)."""
        if "\n" in line:
            raise ValueError("a line must not contain a newline")
        data = line.encode("utf-8") + b"\n"
        self.write_block(data, np.array([len(data)]))

    def write_block(self, data: bytes | memoryview, line_ends: np.ndarray) -> None:
        """Many lines at once (the fast path): `data` holds whole lines, each ending in a newline, and
        `line_ends[i]` is the byte offset just after line i. Files are cut only at line ends."""
        view = memoryview(data)
        start, first = 0, 0
        while first < len(line_ends):
            if self._out is None:
                self._open()
            take = min(self.lines_per_file - self._lines_in_file, len(line_ends) - first)
            end = int(line_ends[first + take - 1])
            self._out.write(view[start:end])
            self._lines_in_file += take
            self.lines_written += take
            start, first = end, first + take
            if self._lines_in_file >= self.lines_per_file:
                self._publish()

    # -- file lifecycle ---------------------------------------------------------------------
    def _open(self) -> None:
        self._seq += 1
        name = f"{self.prefix}-{self._seq:06d}{self.suffix}"
        self._final = self.folder / name
        self._tmp = self.folder / f".{name}.tmp"
        self._raw = open(self._tmp, "wb")  # noqa: SIM115 - stays open across calls until _publish
        # mtime=0 and no file name in the gzip header: same input, byte-identical file.
        self._out = (gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=6)
                     if self.suffix.endswith(".gz") else self._raw)
        self._lines_in_file = 0

    def _publish(self) -> None:
        if self._out is not self._raw:
            self._out.close()  # writes the gzip trailer; the raw file stays open
        self._raw.flush()
        if self.fsync:
            os.fsync(self._raw.fileno())
        self._raw.close()
        os.link(self._tmp, self._final)  # fails rather than overwrite an existing file
        os.unlink(self._tmp)
        self.files.append(self._final)
        self._raw = self._out = self._tmp = self._final = None

    def abort(self) -> None:
        """Drops the unfinished file (published files stay): after an error, never publish half a file."""
        if self._out is not None:
            self._out.close()
            self._raw.close()
            self._tmp.unlink(missing_ok=True)
            self._raw = self._out = self._tmp = self._final = None

    def close(self) -> list[Path]:
        """Publishes the last, partly filled file; returns every file this writer published."""
        if self._out is not None:
            self._publish()
        return self.files

    def __enter__(self) -> LandingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

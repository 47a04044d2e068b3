"""Reading files as they are stored: LMDB files with writemap are sparse, as large as their map (the
counters' 8 GiB), of which only a few pages hold data. The tests that look for key material in the
data dir read only the data."""
from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path


def data_chunks(path: Path, size: int = 4 << 20, overlap: int = 0) -> Iterator[bytes]:
    """The file's bytes in chunks that overlap by `overlap`, skipping holes: LMDB files with writemap are
    sparse files as large as their map (the counters' 8 GiB), of which only a few pages hold data."""
    with open(path, "rb") as f:
        fd = f.fileno()
        end = os.fstat(fd).st_size
        offset = 0
        while offset < end:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
                stop = os.lseek(fd, start, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data past offset
                    return
                start, stop = offset, end  # no SEEK_DATA on this file system: read it all
            if start >= end:
                return
            position = start
            while position < stop:
                f.seek(max(start, position - overlap))
                yield f.read(min(size, stop - position) + (position - max(start, position - overlap)))
                position += size
            offset = stop

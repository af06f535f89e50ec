"""Writing a file so that readers and crashes see the old version or the new one, never a part of one."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write `data` (bytes, or a function that writes into the open binary file it is given, e.g.
    `lambda f: np.savez(f, ...)` or `lambda f: torch.save(obj, f)`) to a new file beside `path`, flush it to disk,
    then rename it over `path`. On any error the temporary file is removed and `path` is left as it was.

    The file is created with plain open(), so it gets the umask's permissions (others can read a shared index or
    model folder), unlike mkstemp's private ones."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # unique: concurrent writers never share one
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

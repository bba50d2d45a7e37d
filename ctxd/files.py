"""Small file helpers: atomic writes with explicit permissions."""

import os
import tempfile


def write_atomic(path: str, data: bytes, mode: int, create_dir: bool = False) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory + rename.

    A symlink at ``path`` is followed (the file it names is replaced, the link
    kept); with ``create_dir`` a missing parent directory is made 0700.
    """
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    if create_dir and not os.path.isdir(directory):
        make_private_dir(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_private(path: str, data: bytes) -> None:
    """A secret: readable by its owner only."""
    write_atomic(path, data, 0o600)


def write_public(path: str, data: bytes) -> None:
    write_atomic(path, data, 0o644)


def make_private_dir(path: str) -> None:
    """Create ``path`` (and parents) and make it 0700."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)

"""A cluster file's ``scripts = "DIR"``: the ctx-scripts tree packed as the broker takes it.

:func:`pack_tree` makes a gzip'd tar that is the same bytes for the same tree wherever and
whenever it is packed (so its SHA-256 names the tree): members sorted by name, names relative
to DIR, mtime 0, owner 0:0 without names, modes 0755 (directories and files with an execute
bit) or 0644, no gzip file name or time. Only regular files and directories travel: a symbolic
link, a device, a FIFO or a socket is refused, as is a name the broker and the agents would
refuse (ctxd.validate.scripts_problem: not printable, absolute, ``..``), naming the file.

Pure standard library (no Twisted), like ctxd.ctxctl.cluster.
"""

import gzip
import io
import os
import stat
import tarfile
from typing import List, Tuple

from ctxd import rules

#: The tar format: PAX stores long or non-ASCII names in the archive itself (USTAR cannot),
#: and Python's tarfile, the agent's too (3.6), reads it.
_FORMAT = tarfile.PAX_FORMAT


class ScriptsError(ValueError):
    """A scripts directory that cannot travel; ``str()`` is one line naming the file."""


def pack_tree(directory: str) -> bytes:
    """The gzip'd tar of the regular files and directories under ``directory`` (not itself).

    ScriptsError when ``directory`` is not a directory, holds anything else, has more than
    rules.MAX_SCRIPT_FILES entries, unpacks to more than rules.MAX_SCRIPTS_UNPACKED bytes or
    packs to more than rules.MAX_SCRIPTS bytes.
    """
    try:
        if not stat.S_ISDIR(os.stat(directory).st_mode):
            raise ScriptsError(f"{directory!r} is not a directory")
    except OSError as e:
        raise ScriptsError(f"cannot read {directory!r}: {_reason(e)}") from None
    members = _members(directory)
    packed = io.BytesIO()
    total = 0
    # mtime=0 and no file name: the gzip header is the same on every run.
    with gzip.GzipFile(filename="", mode="wb", fileobj=packed, mtime=0) as compressed:
        with tarfile.open(fileobj=compressed, mode="w", format=_FORMAT, encoding="utf-8") as tar:
            for name, path, is_dir, executable in members:
                info = tarfile.TarInfo(name)
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                if is_dir:
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                    continue
                info.mode = 0o755 if executable else 0o644
                try:
                    with open(path, "rb") as f:
                        info.size = os.fstat(f.fileno()).st_size
                        total += info.size
                        if total > rules.MAX_SCRIPTS_UNPACKED:
                            raise ScriptsError(f"{directory!r} holds more than {rules.MAX_SCRIPTS_UNPACKED} bytes "
                                               f"of files (at {name!r}); scripts travel in at most "
                                               f"{rules.MAX_SCRIPTS} bytes gzip'd")
                        tar.addfile(info, f)
                except OSError as e:  # unreadable, or it changed size while being packed
                    raise ScriptsError(f"cannot read {_shown(directory, name)}: {_reason(e)}") from None
                if packed.tell() > rules.MAX_SCRIPTS:
                    raise _too_large(directory, name)
    if packed.tell() > rules.MAX_SCRIPTS:
        raise _too_large(directory, None)
    return packed.getvalue()


def _members(directory: str) -> List[Tuple[str, str, bool, bool]]:
    """(name in the archive, path, is a directory, has an execute bit) of every entry under
    ``directory``, sorted by name; ScriptsError for anything that must not travel."""
    found: List[Tuple[str, str, bool, bool]] = []
    todo = [""]
    while todo:
        prefix = todo.pop()
        here = os.path.join(directory, prefix) if prefix else directory
        try:
            entries = sorted(os.listdir(here))
        except OSError as e:
            raise ScriptsError(f"cannot read {_shown(directory, prefix)}: {_reason(e)}") from None
        for entry in entries:
            name = prefix + entry
            _check_name(directory, name)
            path = os.path.join(directory, name)
            try:
                mode = os.lstat(path).st_mode
            except OSError as e:
                raise ScriptsError(f"cannot read {_shown(directory, name)}: {_reason(e)}") from None
            if stat.S_ISLNK(mode):
                raise ScriptsError(f"{_shown(directory, name)} is a symbolic link: scripts travel as regular "
                                   "files and directories only (copy the file it points to)")
            if stat.S_ISDIR(mode):
                found.append((name, path, True, True))
                todo.append(name + "/")
            elif stat.S_ISREG(mode):
                found.append((name, path, False, bool(mode & 0o111)))
            else:
                raise ScriptsError(f"{_shown(directory, name)} is a {_kind(mode)}: scripts travel as regular "
                                   "files and directories only")
            if len(found) > rules.MAX_SCRIPT_FILES:
                raise ScriptsError(f"{directory!r} holds more than {rules.MAX_SCRIPT_FILES} files and "
                                   "directories")
    found.sort(key=lambda member: member[0])
    return found


def _check_name(directory: str, name: str) -> None:
    """What ctxd.validate.scripts_problem refuses, refused here with the file's name."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ScriptsError(f"{_shown(directory, name)}: the name is not UTF-8") from None
    if not name.isprintable() or name.startswith("/") or ".." in name.split("/"):
        raise ScriptsError(f"{_shown(directory, name)}: the name has characters scripts cannot have "
                           "(control characters)")


def _too_large(directory: str, name: object) -> ScriptsError:
    at = f" (at {name!r})" if name else ""
    return ScriptsError(f"{directory!r} packs to more than {rules.MAX_SCRIPTS} bytes gzip'd{at}: "
                        "bake large files into the image, or fetch them from a script")


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def _shown(directory: str, name: str) -> str:
    return repr(os.path.join(directory, name) if name else directory)


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__

"""ctxctl's configuration file: named profiles, each a way to reach one broker as one deployer.

``{"profiles": {"NAME": {"url": "https://HOST:PORT", "ca": "<PEM>", "token": "ctxd_dep_..."}},
"default": "NAME"}`` (docs/ctxctl.md), as ``ctxctl user add NAME --write-config FILE`` writes it.
It holds a token, so it is written 0600 and, like ssh's own files, refused when its group or
others may read or write it, or when another user owns it.

Where it is: ``--config FILE``, else ``$CTXCTL_CONFIG``, else :func:`default_path`; which
profile: ``--profile P``, else ``$CTXCTL_PROFILE``, else the file's ``"default"``, else its only
profile. (How it ranks against the other settings: :func:`ctxd.ctxctl.client.resolve_settings`.)
"""

import errno
import json
import os
import stat
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from ctxd import rules
from ctxd.ctxctl.errors import CliError, reason
from ctxd.files import write_atomic

ENV_CONFIG = "CTXCTL_CONFIG"
ENV_PROFILE = "CTXCTL_PROFILE"
#: What a profile may say; each is optional (what it leaves out may come from elsewhere).
PROFILE_KEYS = ("url", "ca", "token")
MAX_CONFIG = 1 << 20


@dataclass(frozen=True)
class Profile:
    """One profile of a configuration file: what it says of the broker, the CA and the token."""

    name: str
    path: str
    url: Optional[str]
    ca: Optional[str]
    token: Optional[str]

    @property
    def origin(self) -> str:
        """Where it comes from, for messages: ``profile NAME of FILE``."""
        return f"profile {self.name} of {self.path}"


def default_path(environ: Mapping[str, str]) -> str:
    """``$XDG_CONFIG_HOME/ctxctl/config.json``, else ``~/.config/ctxctl/config.json`` (the XDG
    base directory rule: a relative XDG_CONFIG_HOME is ignored)."""
    base = environ.get("XDG_CONFIG_HOME") or ""
    if not os.path.isabs(base):
        home = environ.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".config")
    return os.path.join(base, "ctxctl", "config.json")


def read_config(path: str) -> Dict[str, Any]:
    """The configuration in ``path``, checked: its permissions (0600 or stricter, owned by this
    user or root), its size and its shape. One-line :class:`CliError` for any problem."""
    path = os.path.expanduser(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise CliError(f"config file {path} does not exist") from None
    except OSError as e:
        raise CliError(f"cannot read config file {path}: {reason(e)}") from None
    # Checked on the file opened, not on the name: nothing can swap it in between.
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise CliError(f"config file {path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        check_private(path, info)
        try:
            data = f.read(MAX_CONFIG + 1)
        except OSError as e:
            raise CliError(f"cannot read config file {path}: {reason(e)}") from None
    if len(data) > MAX_CONFIG:
        raise CliError(f"config file {path} is larger than {MAX_CONFIG} bytes")
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CliError(f"config file {path} is not JSON: {reason(e)}") from None
    _check_shape(path, config)
    return config


def check_private(path: str, info: os.stat_result) -> None:
    """Refuse a file that holds a token when others may read or change it (as ssh refuses a
    private key or config file that is not private)."""
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise CliError(f"config file {path} is accessible by others (mode {mode:04o}) and holds a "
                       f"token: chmod 600 {path}")
    if info.st_uid not in (os.getuid(), 0):
        raise CliError(f"config file {path} belongs to another user (uid {info.st_uid})")


def _check_shape(path: str, config: Any) -> None:
    if not isinstance(config, dict):
        raise CliError(f"config file {path}: expected a JSON object with \"profiles\"")
    unknown = sorted(set(config) - {"profiles", "default"})
    if unknown:
        raise CliError(f"config file {path}: unknown key {unknown[0]!r} (it may have \"profiles\" "
                       "and \"default\")")
    profiles = config.get("profiles")
    if not isinstance(profiles, dict) or not profiles:
        raise CliError(f"config file {path}: \"profiles\" must be an object with at least one profile")
    for name, profile in profiles.items():
        if not rules.is_name(name):
            raise CliError(f"config file {path}: profile name {name[:64]!r} is not {rules.NAME_RULE}")
        if not isinstance(profile, dict):
            raise CliError(f"config file {path}: profile {name} is not an object")
        unknown = sorted(set(profile) - set(PROFILE_KEYS))
        if unknown:
            raise CliError(f"config file {path}: profile {name} has an unknown key {unknown[0][:64]!r} "
                           f"(it may have {', '.join(PROFILE_KEYS)})")
        for key in PROFILE_KEYS:
            if not isinstance(profile.get(key, ""), str):
                raise CliError(f"config file {path}: the {key} of profile {name} is not a string")
    default = config.get("default")
    if default is not None and default not in profiles:
        raise CliError(f"config file {path}: \"default\" names no profile ({_names(profiles)})")


def choose_profile(config: Mapping[str, Any], path: str, name: Optional[str]) -> Profile:
    """The profile ``name`` (``--profile``/``$CTXCTL_PROFILE``), else the file's default, else its
    only profile, of a configuration :func:`read_config` checked."""
    profiles = config["profiles"]
    if name is None:
        name = config.get("default")
        if name is None:
            if len(profiles) > 1:
                raise CliError(f"config file {path} has several profiles ({_names(profiles)}) and no "
                               f"\"default\": give --profile NAME or set {ENV_PROFILE}")
            [name] = profiles
    elif name not in profiles:
        raise CliError(f"config file {path} has no profile {name} (it has {_names(profiles)})")
    profile = profiles[name]
    return Profile(name=name, path=path, url=profile.get("url") or None, ca=profile.get("ca") or None,
                   token=profile.get("token") or None)


def _names(profiles: Mapping[str, Any]) -> str:
    return ", ".join(sorted(profiles))


def new_config(profile: str, url: str, ca_pem: str, token: str) -> bytes:
    """A configuration of one profile, ``profile``, which is its default."""
    config = {"profiles": {profile: {"url": url, "ca": ca_pem, "token": token}}, "default": profile}
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def check_writable(path: str, force: bool) -> str:
    """Before anything happens on the broker: ``path`` (expanded) may be written - it does not
    exist yet, or ``force`` says to replace it - and its directory can take it."""
    path = os.path.expanduser(path)
    if os.path.lexists(path):
        if not force:
            raise CliError(f"{path} exists: give --force to replace it")
        if os.path.isdir(path):
            raise CliError(f"{path} is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    existing = directory
    while not os.path.isdir(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"cannot write {path}: {os.strerror(errno.EACCES)} ({existing})")
    return path


def write_config(path: str, content: bytes) -> None:
    """Write a configuration (a token inside: 0600; a missing directory is made 0700)."""
    try:
        write_atomic(path, content, 0o600, create_dir=True)
    except OSError as e:
        raise CliError(f"cannot write {path}: {reason(e)}") from None

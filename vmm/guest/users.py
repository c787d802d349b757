"""Users of the root the agent serves, from *its* /etc/passwd and /etc/group (never the
agent's own: in host mode they are the host's, in the guest there are none)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


class UserError(Exception):
    """No such user, and none can be made."""


@dataclass
class User:
    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: list[int] = field(default_factory=list)


def _entries(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except FileNotFoundError:
        return []


def lookup(root: str, name: str) -> User | None:
    for e in _entries(os.path.join(root, "etc/passwd")):
        if len(e) >= 7 and e[0] == name:
            uid, gid = int(e[2]), int(e[3])
            groups = sorted({gid} | {int(g[2]) for g in _entries(os.path.join(root, "etc/group"))
                                     if len(g) >= 4 and name in g[3].split(",")})
            return User(name, uid, gid, e[5] or "/", e[6] or "/bin/sh", groups)
    return None


def names(root: str, which: str) -> dict[int, str]:
    """id -> name of the root's users ("passwd") or groups ("group")."""
    return {int(e[2]): e[0] for e in _entries(os.path.join(root, "etc", which)) if len(e) >= 3 and e[2].isdigit()}


def ensure(root: str, name: str) -> User:
    """The user ``name``; made if the root lacks it (E2B templates have ``user`` with home
    /home/user, and code run in a sandbox expects it): uid/gid the first free from 1000,
    a home it owns.  A read-only root gets the same identity without the entries."""
    found = lookup(root, name)
    if found is not None:
        return found
    if name == "root" or not name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"no user {name!r} in the root's /etc/passwd")
    taken = set(names(root, "passwd")) | set(names(root, "group"))
    uid = next(i for i in range(1000, 60000) if i not in taken)
    home = f"/home/{name}"
    user = User(name, uid, uid, home, "/bin/bash" if os.path.exists(os.path.join(root, "bin/bash")) else "/bin/sh",
                [uid])
    try:
        with open(os.path.join(root, "etc/passwd"), "a") as f:
            f.write(f"{name}:x:{uid}:{uid}::{home}:{user.shell}\n")
        with open(os.path.join(root, "etc/group"), "a") as f:
            f.write(f"{name}:x:{uid}:\n")
        if os.path.exists(os.path.join(root, "etc/shadow")):
            with open(os.path.join(root, "etc/shadow"), "a") as f:
                f.write(f"{name}:!:19000:0:99999:7:::\n")
        path = os.path.join(root, home.lstrip("/"))
        os.makedirs(path, mode=0o755, exist_ok=True)
        os.chown(path, uid, uid)
    except OSError:
        pass  # a read-only root: the identity still holds for processes and files
    return user

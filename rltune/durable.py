"""Making a new file or a rename survive a power loss, not only a crash of the process.

`os.fsync` on a file puts its bytes on disk, but not its name: the entry that names it lives in
its folder, and by the POSIX rule a new file, a rename or a removal is on disk only once that
folder is synced too. ext4's journal usually orders this by itself; other file systems need not,
and after a power loss a renamed checkpoint could be back under its temporary name, or a new log
file gone. Syncing a folder costs one call, so rltune makes it after each rename and creation
that a resumed run relies on, never per written row.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Put `folder`'s entries (what was created, renamed or removed in it) on disk."""
    if os.name == "nt":  # Windows cannot open a folder to sync it: nothing to do there
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        # POSIX's answer from a file system that cannot sync a folder: nothing more to be had
        if err.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def make_dirs(folder: Path) -> None:
    """`mkdir -p folder`, each folder it creates synced into its parent: everything later
    written inside is only as durable as the names leading to it."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):  # outermost first
        fsync_dir(created.parent)

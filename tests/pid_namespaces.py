"""Which pid namespaces still have a process running, where this process can see every process
of the machine: a folder of a namespace that has ended names nothing that runs (the kernel kills
every process of a pid namespace, those of the namespaces under it too, as its first one ends).

Only a process of the host's pid namespace sees every process (one in a container's sees its
own); and only if /proc is its namespace's and lists every process (no `hidepid` hiding other
users'). A process whose namespace it may not read (another user's, but to root; some sandboxes
refuse root too) is of its own namespace if /proc/<pid>/status, which anyone may read, names it
by one pid (NSpid: one for each namespace from /proc's down to its own); of another, unknown.
Where it cannot tell, which namespaces run is not known: None, and nothing is taken for ended.
"""

from __future__ import annotations

import os
from pathlib import Path

# The kernel's first pid namespace, the host's: its number is the same every boot.
HOST_PID_NAMESPACE = "4026531836"
# `hidepid` values that leave every process listed (1: listed, their files refused).
HIDEPID_LISTING_ALL = {"0", "off", "1", "noaccess"}


def pid_namespace(pid: int | str = "self") -> str:
    """The number of `pid`'s pid namespace (as /proc/<pid>/ns/pid names it: pid:[<n>])."""
    return os.readlink(f"/proc/{pid}/ns/pid").removeprefix("pid:[").removesuffix("]")


def pid_namespaces_running() -> set[str] | None:
    """The numbers of the pid namespaces with a process running; None where this process cannot
    see every process of the machine."""
    if (pid_namespace() != HOST_PID_NAMESPACE or os.readlink("/proc/self") != str(os.getpid())
            or _proc_hides_processes()):
        return None
    running = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            running.add(_namespace_of(entry))
        except (FileNotFoundError, ProcessLookupError):
            continue  # (ended meanwhile)
        except PermissionError:
            return None
    return running


def _namespace_of(pid: str) -> str:
    """The number of `pid`'s pid namespace, this one's if it may not be read and the process is
    of it; PermissionError if it may not be read and is of another."""
    try:
        return pid_namespace(pid)
    except PermissionError:
        with open(f"/proc/{pid}/status") as status:
            pids = next((line.split()[1:] for line in status if line.startswith("NSpid:")), [])
        if len(pids) != 1:
            raise
        return HOST_PID_NAMESPACE


def _proc_hides_processes() -> bool:
    """Whether /proc may leave processes out of its listing: mounted with `hidepid` hiding
    them, or not a proc file system."""
    file_system, options = "", ""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount, _, described = line.partition(" - ")
        if mount.split()[4] == "/proc":  # (the last one, over any below it)
            file_system, _, options = (described.split() + ["", ""])[:3]
    settings = dict(option.partition("=")[::2] for option in options.split(","))
    return file_system != "proc" or settings.get("hidepid", "0") not in HIDEPID_LISTING_ALL

"""Where sandbox processes run: in their own kernel namespaces (bubblewrap), or as plain child processes.

Trust boundary: everything started here (the agent's interpreter, each grading process)
runs code the server must not trust. In ``namespaces`` mode each one is started as

    bwrap --unshare-all --new-session --die-with-parent --cap-drop ALL --uid 65534 ...

with a new user, mount, pid, network, IPC and UTS namespace, so it

* sees a root filesystem made only of read-only binds of the system directories
  (``/usr``, ``/etc``, ``/bin`` ...) and of the Python it runs (base prefix, venv), with
  the envserver package directory covered by an empty tmpfs: not the server's working
  directory, its temp files, ``/run`` (secrets), ``/home``, ``/root``, nor any repository;
* writes only to its own size-capped tmpfs ``/tmp`` (its working directory and HOME),
  which no other sandbox can see and which vanishes with it;
* sees only its own processes (a fresh ``/proc`` of its pid namespace): not the server,
  not another session;
* has no network at all: only a loopback interface of its own, so not even the
  server's port on 127.0.0.1;
* runs with no capabilities; when the server runs as root, bubblewrap sets up the
  namespaces as root (no user namespace) and ``setpriv`` drops the program to uid 65534
  with an empty capability bounding set and no-new-privs, so it is not root anywhere;
  otherwise it runs as the server's user inside a user namespace.

Killing the bubblewrap process (the parent kills by process group) kills the namespace's
init, and the kernel then kills every process left in the namespace.

In ``process`` mode (no bubblewrap, or user namespaces refused, e.g. Docker's default
seccomp profile) the code runs as a child of the server with the server's user, network
and filesystem: a private temp directory and rlimits, nothing more. Use it only where
the container around the server is the isolation (see the README).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import msgspec

from .worker import proc_stat

log = logging.getLogger("envserver.sandbox")

SANDBOX_UID = 65534  # "nobody": the user sandboxes run as when the server is root
SETPRIV = "/usr/bin/setpriv"
SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
POLICIES = ("auto", "namespaces", "process")
_PACKAGE_DIR = str(Path(__file__).resolve().parents[2])  # envserver/: tasks, harness, server code


class Isolation(msgspec.Struct, frozen=True):
    """The mode sandbox processes run in, and why."""

    mode: str  # "namespaces" or "process"
    reason: str


class Spawned(msgspec.Struct):
    """A started sandbox process and the host directory to remove after it (process mode only)."""

    proc: subprocess.Popen[bytes]
    workdir: str | None


def _mount_args() -> list[str]:
    """Read-only binds of the system and Python directories (parents created 0755), the package dir hidden."""
    args: list[str] = []
    bound: list[str] = []
    made: set[str] = set()
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
            bound.append(path)
    for path in _python_dirs():
        if any(_within(path, outer) for outer in bound):
            continue
        parent = os.path.dirname(path)
        ancestors = []
        while parent not in ("/", "") and parent not in made:
            ancestors.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(ancestors):  # bwrap would make them 0700, closed to the sandbox user
            args += ["--perms", "0755", "--dir", directory]
            made.add(directory)
        args += ["--ro-bind", path, path]
        bound.append(path)
    if any(_within(_PACKAGE_DIR, outer) for outer in bound):
        args += ["--tmpfs", _PACKAGE_DIR]  # installed in site-packages: hide it
    return args


def _within(path: str, outer: str) -> bool:
    return path == outer or path.startswith(outer.rstrip("/") + "/")


def _python_dirs() -> list[str]:
    """The directories this Python needs: its prefixes, its real executable's directory, its site-packages."""
    found = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    found.update(site_dirs())
    dirs = [p for p in found if os.path.isdir(p)]
    dirs += [os.path.realpath(p) for p in dirs]  # both the path and its target, so symlinks resolve inside
    return sorted(set(dirs))


def site_dirs() -> list[str]:
    """The server's site-packages directories: what the agent's code may import, read-only."""
    return [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]


_mounts: list[str] | None = None
_detected: dict[str, Isolation] = {}
_lock = threading.Lock()


def _bwrap_prefix(bwrap: str, disk_mb: int) -> list[str]:
    """The command line before the sandboxed program.

    A root server runs bubblewrap as root without a user namespace and ``setpriv`` drops
    the program to uid 65534 with no capabilities; any other user gets a user namespace.
    """
    global _mounts
    if _mounts is None:
        _mounts = _mount_args()
    if os.geteuid() == 0:
        unshare = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        drop = [SETPRIV, f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]  # fmt: skip
    else:
        unshare, drop = ["--unshare-all", "--cap-drop", "ALL"], []
    return [
        bwrap, *unshare, "--die-with-parent", "--new-session", "--hostname", "sandbox",
        # /tmp first: a Python under /tmp (a venv in a checkout there) is then bound on top of it, not hidden by it
        "--size", str(disk_mb << 20), "--perms", "1777", "--tmpfs", "/tmp",
        *_mounts,
        "--proc", "/proc", "--dev", "/dev",
        "--chdir", "/tmp",
        *drop,
    ]  # fmt: skip


def detect(policy: str = "auto", bwrap: str | None = None) -> Isolation:
    """The isolation sandboxes get under ``policy``: probe bubblewrap once and cache the answer."""
    if policy not in POLICIES:
        raise ValueError(f"unknown isolation {policy!r}; use one of {', '.join(POLICIES)}")
    if policy == "process":
        return Isolation("process", "the operator chose process isolation")
    key = bwrap or ""
    with _lock:
        found = _detected.get(key)
        if found is None:
            found = _detected[key] = _probe(bwrap or shutil.which("bwrap"))
            if found.mode == "process":
                log.warning("python_sandbox: no namespace isolation (%s); sandboxes run as plain child processes", found.reason)
            else:
                log.info("python_sandbox: sandboxes run in their own namespaces (%s)", found.reason)
    if policy == "namespaces" and found.mode != "namespaces":
        raise RuntimeError(f"namespace isolation was required but is unavailable: {found.reason}")
    return found


def _probe(bwrap: str | None) -> Isolation:
    if bwrap is None:
        return Isolation("process", "bubblewrap (bwrap) is not installed")
    try:
        if os.geteuid() == 0 and not os.access(SETPRIV, os.X_OK):
            return Isolation("process", f"{SETPRIV} (util-linux) is missing: a root server needs it to drop privileges")
        run = subprocess.run(
            [*_bwrap_prefix(bwrap, 1), sys.executable, "-I", "-S", "-c", "pass"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=20,
            env={"PATH": "/usr/bin:/bin"},
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return Isolation("process", f"bubblewrap could not run: {exc}")
    if run.returncode != 0:
        detail = run.stderr.decode("utf-8", "replace").strip().splitlines()
        return Isolation("process", f"bubblewrap failed: {detail[-1] if detail else f'exit status {run.returncode}'}")
    return Isolation("namespaces", bwrap)


def spawn(
    argv: list[str],
    isolation: Isolation,
    *,
    env: dict[str, str],
    stdout: int,
    stderr: int,
    pass_fds: tuple[int, ...],
    disk_mb: int,
) -> Spawned:
    """Start ``argv`` in a fresh sandbox: its own session and process group, HOME/TMPDIR its private directory."""
    workdir = None
    if isolation.mode == "namespaces":
        argv, home = [*_bwrap_prefix(isolation.reason, disk_mb), *argv], "/tmp"
    else:
        workdir = home = tempfile.mkdtemp(prefix="envfleet-sandbox-")
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            pass_fds=pass_fds,
            cwd=workdir,
            env={**env, "HOME": home, "TMPDIR": home},
            start_new_session=True,  # its own session and process group: one kill takes all
        )
    except BaseException:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    return Spawned(proc, workdir)


def exit_status(code: int | None, isolation: Isolation) -> int | None:
    """The sandboxed program's status as Popen reports it (-N for signal N); bubblewrap reports 128+N."""
    if code is not None and isolation.mode == "namespaces" and code > 128:
        return -(code - 128)
    return code


def kill_tree(proc: subprocess.Popen[bytes], isolation: Isolation, *, strays: bool) -> None:
    """SIGKILL a sandbox: its process group (in namespaces: its init, which takes the namespace along).

    With ``strays`` in process mode, also every descendant that left the group (``setsid``).
    Call it only while ``proc`` is unreaped, so its pid cannot belong to someone else.
    """
    victims = [(os.killpg, proc.pid)]
    if strays and isolation.mode == "process":
        victims += [(os.kill, pid) for pid in descendants(proc.pid)]
    for kill, pid in victims:
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass


def descendants(root: int) -> list[int]:
    """Every live descendant of ``root`` (by parent links, so also those in other sessions)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = proc_stat(name)
            if fields:
                children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found

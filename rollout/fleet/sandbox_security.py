"""How containers that run the Python sandbox are set up: a seccomp profile (docker), one session each (swarm).

Docker's default profile refuses ``unshare`` and ``clone`` with namespace flags, ``mount``
and ``pivot_root`` to a process without CAP_SYS_ADMIN: exactly what bubblewrap needs to
give each sandbox its own user, mount, pid and network namespaces inside the container.
This profile allows those (the kernel still limits them to namespaces the container's
unprivileged user owns) and refuses the system calls a sandbox never needs and that
widen the kernel surface reachable from a user namespace: kernel modules and kexec,
keyrings, BPF, perf, userfaultfd, io_uring, the new mount API, ptrace and cross-process
memory access, clock and swap changes, reboot. Everything else is allowed.

A fresh ``/proc`` for the sandbox's pid namespace can only be mounted where the
container's own ``/proc`` has no masked or read-only sub-mounts, hence empty
``MaskedPaths`` and ``ReadonlyPaths`` (what the CLI's ``--security-opt
systempaths=unconfined`` sets); the server runs as uid 65534 with no capabilities, so
the files this uncovers (``/proc/kcore``, ``/proc/sys`` ...) stay unreadable or
unwritable to it and to its sandboxes.

``deploy/seccomp-sandbox.json`` is this profile written out (a test keeps them equal),
for ``docker run --security-opt seccomp=deploy/seccomp-sandbox.json`` and other runtimes.

Swarm services (Docker Engine API before 1.44) cannot carry a seccomp profile, so there
the sandboxes fall back to plain child processes and sessions sharing a container
could see each other: a swarm server of such an environment holds one session unless
the operator sets ``max_sessions`` (an explicit opt-in to share).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["SANDBOX_ENVS", "profile", "profile_json", "sandbox_host_config", "swarm_session_args"]

SANDBOX_ENVS = frozenset({"python_sandbox"})  # environments that run agents' code in bubblewrap sandboxes

_REFUSED = (
    # kernel modules, kexec, reboot, swap, accounting, quotas
    "init_module", "finit_module", "delete_module", "create_module", "query_module", "get_kernel_syms",
    "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd",
    # keyrings, BPF, perf, userfaultfd, io_uring
    "add_key", "request_key", "keyctl", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # the new mount API (bubblewrap uses mount(2)), handles that bypass paths, joining other namespaces
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "open_by_handle_at", "name_to_handle_at", "setns",
    # other processes' memory, tracing
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # clocks, legacy and obsolete calls, raw I/O, NUMA policy, kernel log
    "settimeofday", "clock_settime", "clock_settime64", "clock_adjtime", "clock_adjtime64", "adjtimex", "stime",
    "uselib", "ustat", "sysfs", "_sysctl", "nfsservctl", "vm86", "vm86old", "lookup_dcookie",
    "iopl", "ioperm", "syslog", "mbind", "set_mempolicy", "move_pages", "get_mempolicy", "vhangup",
)  # fmt: skip


def profile() -> dict[str, Any]:
    """The profile as Docker's seccomp JSON: allow by default, refuse the listed calls with EPERM."""
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        "syscalls": [{"names": sorted(_REFUSED), "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    }


def profile_json() -> str:
    """The profile file's text (``deploy/seccomp-sandbox.json``)."""
    return json.dumps(profile(), indent=2) + "\n"


def sandbox_host_config(env: str, host_config: dict[str, Any]) -> dict[str, Any]:
    """``host_config`` (a container's ``HostConfig``) with what sandboxes need if ``env`` runs them: the profile, unmasked /proc."""
    if env not in SANDBOX_ENVS:
        return host_config
    seccomp = f"seccomp={json.dumps(profile(), separators=(',', ':'))}"
    return {**host_config, "SecurityOpt": [*host_config.get("SecurityOpt", []), seccomp], "MaskedPaths": [], "ReadonlyPaths": []}


def swarm_session_args(env: str, max_sessions: int | None) -> list[str]:
    """``envserver`` arguments that keep one sandbox session per swarm container unless the operator chose a cap."""
    if env in SANDBOX_ENVS and max_sessions is None:
        return ["--max-sessions", "1"]
    return []

"""The seccomp filter of every runc task: the container runtimes' default profile.

This is the profile Docker, containerd and Kubernetes' RuntimeDefault apply (moby's
profiles/seccomp/default.json, containerd's contrib/seccomp), as it comes out for a
process with no capabilities: every syscall the profile grants only with a capability
(mount, unshare, setns, ptrace, bpf, perf_event_open, reboot, module loading, acct,
settimeofday, chroot, ...) is simply absent, and clone may not create namespaces. The
default action fails everything else with EPERM, so a denied call looks like a missing
privilege, which programs already handle.

Deviations from the upstream profile, each on purpose:
- io_uring_* are denied, as in Docker 25 and containerd 2.0 (a ring performs syscalls the
  filter never sees, and it has been the source of many kernel exploits).
- The calls of Linux 6.5 to 6.7 that upstream allowed in 2024 (cachestat, fchmodat2,
  map_shadow_stack, futex_wait/wake/requeue) are in. runc skips names its libseccomp
  cannot resolve, and answers ENOSYS, not EPERM, for every syscall numbered above the
  highest listed one it resolved: a newer kernel's calls (mseal, statmount, ...) look
  unimplemented to the task, and glibc falls back to the older ones.

The profile is the OCI `linux.seccomp` object that runc turns into a BPF program with
libseccomp. It is data only: building it does no I/O and never raises.
"""

from __future__ import annotations

import errno
from typing import Literal, NotRequired, TypedDict


class SyscallArg(TypedDict):
    """A condition on one argument (OCI LinuxSeccompArg)."""

    index: int
    value: int
    valueTwo: int
    op: Literal["SCMP_CMP_EQ", "SCMP_CMP_NE", "SCMP_CMP_MASKED_EQ"]


class SyscallRule(TypedDict):
    """What happens to the named syscalls (OCI LinuxSyscall); all args must match."""

    names: list[str]
    action: Literal["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO"]
    errnoRet: NotRequired[int]
    args: NotRequired[list[SyscallArg]]


class SeccompProfile(TypedDict):
    """The OCI linux.seccomp object."""

    defaultAction: Literal["SCMP_ACT_ERRNO"]
    defaultErrnoRet: int
    architectures: list[str]
    syscalls: list[SyscallRule]


# -- the allow-list, by what programs use the calls for ----------------------------------------
# Each group is sorted. Names such as chown32, fcntl64 or clock_gettime64 exist only in the
# 32-bit ABIs (i386 and arm binaries run on x86_64 and aarch64 hosts); each architecture's
# filter gets the names it has.

# Files and directories: open, read, write, stat, link, rename, sync, copy, xattrs, and ioctl
# (terminals, FIONREAD; device access is limited by the cgroup's device list, not here).
FILES = (
    "_llseek", "access", "cachestat", "chdir", "chmod", "chown", "chown32", "close",
    "close_range", "copy_file_range", "creat", "dup", "dup2", "dup3", "faccessat",
    "faccessat2", "fadvise64", "fadvise64_64", "fallocate", "fchdir", "fchmod", "fchmodat",
    "fchmodat2", "fchown", "fchown32", "fchownat", "fcntl", "fcntl64", "fdatasync",
    "fgetxattr", "flistxattr", "flock", "fremovexattr", "fsetxattr", "fstat", "fstat64",
    "fstatat64", "fstatfs", "fstatfs64", "fsync", "ftruncate", "ftruncate64", "futimesat",
    "getcwd", "getdents", "getdents64", "getxattr", "ioctl", "lchown", "lchown32",
    "lgetxattr", "link", "linkat", "listxattr", "llistxattr", "lremovexattr", "lseek",
    "lsetxattr", "lstat", "lstat64", "mkdir", "mkdirat", "mknod", "mknodat",
    "name_to_handle_at", "newfstatat", "open", "openat", "openat2", "pread64", "preadv",
    "preadv2", "pwrite64", "pwritev", "pwritev2", "read", "readahead", "readlink",
    "readlinkat", "readv", "removexattr", "rename", "renameat", "renameat2", "rmdir",
    "sendfile", "sendfile64", "setxattr", "splice", "stat", "stat64", "statfs", "statfs64",
    "statx", "symlink", "symlinkat", "sync", "sync_file_range", "syncfs", "tee", "truncate",
    "truncate64", "umask", "unlink", "unlinkat", "utime", "utimensat", "utimensat_time64",
    "utimes", "vmsplice", "write", "writev",
)

# Asynchronous file I/O (Linux AIO, used by databases) and I/O priorities of the caller's
# own processes. Not io_uring: see the module docstring.
ASYNC_IO = (
    "io_cancel", "io_destroy", "io_getevents", "io_pgetevents", "io_pgetevents_time64",
    "io_setup", "io_submit", "ioprio_get", "ioprio_set",
)

# Waiting on file descriptors: pipes, event loops, eventfd/signalfd/timerfd, inotify and
# fanotify marks (creating a fanotify group needs CAP_SYS_ADMIN, so fanotify_init is not here).
EVENTS = (
    "_newselect", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_ctl_old",
    "epoll_pwait", "epoll_pwait2", "epoll_wait", "epoll_wait_old", "eventfd", "eventfd2",
    "fanotify_mark", "inotify_add_watch", "inotify_init", "inotify_init1",
    "inotify_rm_watch", "pipe", "pipe2", "poll", "ppoll", "ppoll_time64", "pselect6",
    "pselect6_time64", "select", "signalfd", "signalfd4", "timerfd_create",
    "timerfd_gettime", "timerfd_gettime64", "timerfd_settime", "timerfd_settime64",
)

# Memory of the calling process (mlock is bounded by RLIMIT_MEMLOCK and the memory cgroup).
MEMORY = (
    "brk", "madvise", "map_shadow_stack", "membarrier", "memfd_create", "memfd_secret",
    "mincore", "mlock", "mlock2", "mlockall", "mmap", "mmap2", "mprotect", "mremap",
    "msync", "munlock", "munlockall", "munmap", "pkey_alloc", "pkey_free", "pkey_mprotect",
    "remap_file_pages",
)

# Processes and threads: exec, exit, fork (clone is conditional, below), wait, sessions,
# rlimits, prctl, seccomp (a task may only add filters), landlock (only restricts itself),
# pidfds of processes the task may signal anyway, and the kernel's random numbers.
PROCESSES = (
    "capget", "capset", "execve", "execveat", "exit", "exit_group", "fork",
    "get_robust_list", "get_thread_area", "getcpu", "getpgid", "getpgrp", "getpid",
    "getppid", "getpriority", "getrandom", "getrlimit", "getrusage", "getsid", "gettid",
    "landlock_add_rule", "landlock_create_ruleset", "landlock_restrict_self", "pidfd_open",
    "pidfd_send_signal", "prctl", "prlimit64", "process_mrelease", "restart_syscall",
    "rseq", "seccomp", "set_robust_list", "set_thread_area", "set_tid_address", "setpgid",
    "setpriority", "setrlimit", "setsid", "sysinfo", "times", "ugetrlimit", "uname",
    "vfork", "wait4", "waitid", "waitpid",
)

# CPU scheduling of the task's own threads (raising priority still needs CAP_SYS_NICE).
SCHEDULING = (
    "sched_get_priority_max", "sched_get_priority_min", "sched_getaffinity",
    "sched_getattr", "sched_getparam", "sched_getscheduler", "sched_rr_get_interval",
    "sched_rr_get_interval_time64", "sched_setaffinity", "sched_setattr",
    "sched_setparam", "sched_setscheduler", "sched_yield",
)

# Locks between threads and processes.
FUTEXES = (
    "futex", "futex_requeue", "futex_time64", "futex_wait", "futex_waitv", "futex_wake",
)

# Signals, to the task's own processes (the pid namespace hides every other one).
SIGNALS = (
    "alarm", "kill", "pause", "rt_sigaction", "rt_sigpending", "rt_sigprocmask",
    "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait",
    "rt_sigtimedwait_time64", "rt_tgsigqueueinfo", "sigaltstack", "sigprocmask",
    "sigreturn", "tgkill", "tkill",
)

# Clocks, sleeps and timers. adjtimex and clock_adjtime only read without CAP_SYS_TIME;
# settimeofday, stime and clock_settime are not here at all.
TIME = (
    "adjtimex", "clock_adjtime", "clock_adjtime64", "clock_getres", "clock_getres_time64",
    "clock_gettime", "clock_gettime64", "clock_nanosleep", "clock_nanosleep_time64",
    "getitimer", "gettimeofday", "nanosleep", "setitimer", "time", "timer_create",
    "timer_delete", "timer_getoverrun", "timer_gettime", "timer_gettime64",
    "timer_settime", "timer_settime64",
)

# User and group ids: reading them, and the set* calls that only switch among the ids the
# process already has (anything else needs CAP_SETUID/CAP_SETGID).
CREDENTIALS = (
    "getegid", "getegid32", "geteuid", "geteuid32", "getgid", "getgid32", "getgroups",
    "getgroups32", "getresgid", "getresgid32", "getresuid", "getresuid32", "getuid",
    "getuid32", "setfsgid", "setfsgid32", "setfsuid", "setfsuid32", "setgid", "setgid32",
    "setgroups", "setgroups32", "setregid", "setregid32", "setresgid", "setresgid32",
    "setresuid", "setresuid32", "setreuid", "setreuid32", "setuid", "setuid32",
)

# Sockets once opened (socket itself is conditional, below). socketcall is the i386
# multiplexer of all of them, socket included: see default_profile() on AF_VSOCK.
SOCKETS = (
    "accept", "accept4", "bind", "connect", "getpeername", "getsockname", "getsockopt",
    "listen", "recv", "recvfrom", "recvmmsg", "recvmmsg_time64", "recvmsg", "send",
    "sendmmsg", "sendmsg", "sendto", "setsockopt", "shutdown", "socketcall", "socketpair",
)

# System V IPC and POSIX message queues, private to the task's ipc namespace.
IPC = (
    "ipc", "mq_getsetattr", "mq_notify", "mq_open", "mq_timedreceive",
    "mq_timedreceive_time64", "mq_timedsend", "mq_timedsend_time64", "mq_unlink", "msgctl",
    "msgget", "msgrcv", "msgsnd", "semctl", "semget", "semop", "semtimedop",
    "semtimedop_time64", "shmat", "shmctl", "shmdt", "shmget",
)

# Every syscall allowed whatever its arguments, on every architecture.
ALLOWED: tuple[str, ...] = tuple(
    sorted(
        FILES + ASYNC_IO + EVENTS + MEMORY + PROCESSES + SCHEDULING + FUTEXES + SIGNALS
        + TIME + CREDENTIALS + SOCKETS + IPC
    )
)

# Architecture-specific calls that glibc and JITs make: the x86 TLS and LDT setup; ARM's
# cache flush, TLS register and the 32-bit ABI's reordered-argument variants.
X86_ALLOWED = ("arch_prctl", "modify_ldt")
ARM_ALLOWED = (
    "arm_fadvise64_64", "arm_sync_file_range", "breakpoint", "cacheflush", "set_tls",
    "sync_file_range2",
)

# What is denied deliberately, for the tests and for readers: nothing here may appear above.
# Namespaces and mounts, tracing other processes, kernel keyrings, eBPF and perf, loading
# kernel code or rebooting, clocks and accounting, io_uring, userfaultfd, raw I/O ports.
DENIED = (
    "acct", "add_key", "bpf", "chroot", "delete_module", "finit_module", "fsconfig",
    "fsmount", "fsopen", "fspick", "init_module", "io_uring_enter", "io_uring_register",
    "io_uring_setup", "ioperm", "iopl", "kcmp", "kexec_file_load", "kexec_load", "keyctl",
    "lookup_dcookie", "mount", "mount_setattr", "move_mount", "open_by_handle_at",
    "open_tree", "perf_event_open", "pidfd_getfd", "pivot_root", "process_madvise",
    "process_vm_readv", "process_vm_writev", "ptrace", "quotactl", "quotactl_fd", "reboot",
    "request_key", "setdomainname", "sethostname", "setns", "settimeofday", "swapoff",
    "swapon", "syslog", "umount", "umount2", "unshare", "userfaultfd", "vhangup",
)

# Namespace flags of clone(2); a clone with any of them is refused (the kernel would refuse
# most without CAP_SYS_ADMIN anyway, but CLONE_NEWUSER needs no capability at all).
CLONE_NEWNS = 0x0002_0000
CLONE_NEWCGROUP = 0x0200_0000
CLONE_NEWUTS = 0x0400_0000
CLONE_NEWIPC = 0x0800_0000
CLONE_NEWUSER = 0x1000_0000
CLONE_NEWPID = 0x2000_0000
CLONE_NEWNET = 0x4000_0000
CLONE_NAMESPACES = (
    CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
    | CLONE_NEWPID | CLONE_NEWNET
)

# personality(2) values that change nothing dangerous: Linux, 32-bit uname (PER_LINUX32),
# a 2.6.x kernel version for old programs (UNAME26), both, and 0xffffffff which only
# queries. ADDR_NO_RANDOMIZE (setarch -R) and READ_IMPLIES_EXEC are not among them.
PERSONALITIES = (0x0, 0x0008, 0x0002_0000, 0x0002_0008, 0xFFFF_FFFF)

# Vsock reaches the hypervisor, not the network.
AF_VSOCK = 40

# libseccomp's names for the architectures whose syscalls a host of each machine type
# runs: the native one and the 32-bit ABIs it can execute.
# Native ABIs only. Unlike Docker's profile, 32-bit x86 and x32 are left out: their
# socketcall path bypasses argument filters (a task could open AF_VSOCK sockets through
# int 0x80), and every extra ABI makes runc compile the filter again inside the task's
# CPU quota (~10 ms instead of ~3 ms per start). A 32-bit call now kills the caller.
ARCHITECTURES = {
    "x86_64": ["SCMP_ARCH_X86_64"],
    "aarch64": ["SCMP_ARCH_AARCH64"],
}
# Other spellings of the same machines (Go's GOARCH, BSD's uname).
MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


def default_profile(arch: str) -> SeccompProfile:
    """The OCI linux.seccomp object for a host whose machine type is arch.

    arch is what platform.machine() says (x86_64, aarch64; amd64 and arm64 are taken
    too). On any other machine the profile lists no architectures, so runc filters the
    native ABI only (a syscall of another ABI kills the caller with SIGSYS), without the
    arch-specific calls: tasks that need those fail with EPERM, which is a reason to add
    the machine here. Returns a new object each call; never raises.
    """
    machine = MACHINE_ALIASES.get(arch, arch)
    allowed = list(ALLOWED)
    if machine == "x86_64":
        allowed += X86_ALLOWED
    elif machine == "aarch64":
        allowed += ARM_ALLOWED
    syscalls: list[SyscallRule] = [
        {"names": sorted(allowed), "action": "SCMP_ACT_ALLOW"},
        # Threads, fork and vfork, but no new namespaces (flags are clone's first argument
        # everywhere but s390, which this profile does not cover).
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [_arg(0, CLONE_NAMESPACES, "SCMP_CMP_MASKED_EQ", value_two=0)],
        },
        # clone3 passes its flags in memory, which seccomp cannot read: ENOSYS makes glibc
        # (2.34+) and everyone else fall back to clone, which the rule above checks.
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS},
        # No vsock sockets, as upstream. Not airtight on x86_64 hosts with i386 emulation:
        # libseccomp also allows the i386 socketcall(SYS_SOCKET), whose arguments are in
        # memory, so int 0x80 still creates them (leaving SCMP_ARCH_X86 out of the
        # architectures would close that, killing every i386 syscall instead).
        {
            "names": ["socket"],
            "action": "SCMP_ACT_ALLOW",
            "args": [_arg(0, AF_VSOCK, "SCMP_CMP_NE")],
        },
    ]
    # One rule per value: a rule's args must all hold, separate rules are alternatives.
    syscalls += [
        {
            "names": ["personality"],
            "action": "SCMP_ACT_ALLOW",
            "args": [_arg(0, value, "SCMP_CMP_EQ")],
        }
        for value in PERSONALITIES
    ]
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": errno.EPERM,
        "architectures": list(ARCHITECTURES.get(machine, [])),
        "syscalls": syscalls,
    }


def _arg(
    index: int,
    value: int,
    op: Literal["SCMP_CMP_EQ", "SCMP_CMP_NE", "SCMP_CMP_MASKED_EQ"],
    *,
    value_two: int = 0,
) -> SyscallArg:
    """A condition on argument index; for SCMP_CMP_MASKED_EQ, value is the mask and
    value_two what the masked argument must equal."""
    return {"index": index, "value": value, "valueTwo": value_two, "op": op}

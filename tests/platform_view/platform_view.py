"""Platform views: the library and its tests see Windows' or macOS's Python API
while they run on Linux.

Why: no machine of ours runs Windows or macOS, and a Linux-only import on the
spawn path once broke every spawned worker on Windows without any test
noticing. A view makes such a mistake fail here first.

How it is scoped: only the modules of the library (``trio_parallel_fs``,
``_trio_parallel_fs_worker``) and of this checkout's ``tests``, ``docs`` and
``bench`` folders see the view. Each such module gets builtins of its own whose
``__import__`` hands it view modules (``sys``, ``os``, ``socket``, ...) and
refuses the modules the platform lacks (``fcntl`` on Windows, ...), and whose
``open`` finds no ``/proc``. trio, psutil, numpy and the standard library keep
their real Linux code: a global ``sys.platform`` change would send them down
paths that cannot run here. The library does not know the view exists.

Turned on by ``sitecustomize`` beside this file when ``TPF_PLATFORM_VIEW`` is
``windows`` or ``macos`` and this folder is on ``PYTHONPATH``: child processes
(the template, spawned workers, example scripts) inherit both and see the same
view. ``.ci/run`` runs the spawn tests under the Windows view and the whole
suite under the macOS view.

What a view cannot show (handles, Job Objects, a reset on close with unread
data, kqueue, exit codes on Windows beyond "1 when killed") is written down in
docs/platforms.rst.
"""

from __future__ import annotations

import builtins
import collections
import enum
import errno
import importlib
import importlib._bootstrap as _bootstrap
import os
import stat
import sys
import types
from typing import Any

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SCOPED_PACKAGES = ("trio_parallel_fs", "_trio_parallel_fs_worker")
_SCOPED_FOLDERS = tuple(os.path.join(CHECKOUT, name) + os.sep for name in ("tests", "docs", "bench"))
_THIS_FOLDER = os.path.dirname(os.path.abspath(__file__)) + os.sep


class ViewModule(types.ModuleType):
    """A module as the platform has it: the real one's attributes, less the
    hidden names, with some replaced. Assigning an attribute sets the real
    module's, except for replaced and hidden names, which stay the view's own
    (so that a test's monkeypatch of ``sys.platform`` does not reach trio)."""

    def __init__(self, real: types.ModuleType, replaced: dict[str, Any], hidden: set[str]) -> None:
        super().__init__(real.__name__, real.__doc__)
        object.__setattr__(self, "_view_real", real)
        object.__setattr__(self, "_view_hidden", set(hidden) - set(replaced))
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        if name in self._view_hidden:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r} on this platform")
        return getattr(self._view_real, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__ or name in self._view_hidden:
            self._view_hidden.discard(name)
            self.__dict__[name] = value
        else:
            setattr(self._view_real, name, value)

    def __delattr__(self, name: str) -> None:
        if name in self.__dict__:
            del self.__dict__[name]
            self._view_hidden.add(name)
        else:
            delattr(self._view_real, name)

    def __dir__(self) -> list[str]:
        return sorted((set(dir(self._view_real)) | set(self.__dict__)) - self._view_hidden)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # cloudpickle pickles a module by name; this one too (a worker's
        # function pickled by value may hold it as a global).
        return import_as_seen, (self.__name__,)


_installed: View | None = None


def import_as_seen(name: str) -> types.ModuleType:
    """The module ``name`` as the scoped modules of this process see it."""
    if _installed is not None and name in _installed.modules:
        return _installed.modules[name]
    return importlib.import_module(name)


def _hidden_property(name: str) -> property:
    def absent(self: object) -> Any:
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r} on this platform")

    return property(absent)


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def _fileno(obj: Any) -> int:
    return obj if isinstance(obj, int) else obj.fileno()


class View:
    """What one platform has; ``install()`` makes the scoped modules see it."""

    def __init__(self, name: str) -> None:
        if name not in ("windows", "macos"):
            raise SystemExit(f"TPF_PLATFORM_VIEW must be 'windows' or 'macos', not {name!r}")
        self.name = name
        self.windows = name == "windows"
        # Paths that do not exist there. Windows' null device is spelled
        # differently, but it exists: os.devnull stays.
        self.absent_paths = ("/proc", "/sys") + (("/dev",) if self.windows else ("/dev/shm",))
        # (posix stays: the parent's real pickler names os.getpid "posix.getpid",
        # and a worker's unpickler imports through the view.)
        self.absent_modules = (
            {"fcntl", "resource", "termios", "_posixshmem", "_posixsubprocess", "pwd", "grp", "pty", "tty"}
            if self.windows
            else set()
        )
        self.real_import = builtins.__import__
        self.modules: dict[str, types.ModuleType] = {}
        for module_name in ("sys", "os", "socket", "select", "selectors", "signal", "subprocess", "mmap"):
            self.modules[module_name] = getattr(self, f"_make_{module_name}")(importlib.import_module(module_name))
        for module_name in ("psutil", "ctypes", "platform", "importlib", "fcntl", "_posixshmem"):
            if module_name not in self.absent_modules:
                self.modules[module_name] = getattr(self, f"_make_{module_name}")(importlib.import_module(module_name))
        self.builtins = dict(builtins.__dict__, __import__=self.view_import, open=self._guard_path(builtins.open))

    # --- what a scoped module sees --------------------------------------------

    def view_import(
        self, name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
    ) -> types.ModuleType:
        if level == 0:
            top = name.partition(".")[0]
            if top in self.absent_modules:
                raise ModuleNotFoundError(f"No module named {top!r}", name=top)
            if top in self.modules:
                module = self.real_import(name, globals, locals, fromlist, level)
                if name == top or not fromlist:
                    return self.modules[top]
                return module  # "from os.path import join": the submodule itself
        return self.real_import(name, globals, locals, fromlist, level)

    def covers(self, name: str, origin: str | None) -> bool:
        if name.partition(".")[0] in _SCOPED_PACKAGES:
            return True
        # Only a file's origin is a path ("frozen" and "built-in" are not).
        if not origin or not os.path.isabs(origin) or origin.startswith(_THIS_FOLDER):
            return False
        return origin.startswith(_SCOPED_FOLDERS)

    def install(self) -> None:
        """Every scoped module imported from now on gets the view's builtins
        before its code runs; so does ``__main__`` when it is ours."""
        real_module_from_spec = _bootstrap.module_from_spec

        def module_from_spec(spec: Any) -> types.ModuleType:
            module = real_module_from_spec(spec)
            if self.covers(spec.name, spec.origin):
                module.__dict__["__builtins__"] = self.builtins
            return module

        # _load_unlocked looks the name up at each import: this is the one
        # place every loader's module comes from (pytest's rewriting one too).
        _bootstrap.module_from_spec = module_from_spec
        main = sys.modules["__main__"]
        if self._main_is_ours():
            main.__dict__["__builtins__"] = self.builtins

    def _main_is_ours(self) -> bool:
        argv = getattr(sys, "orig_argv", sys.argv)
        if "-m" in argv[1:]:
            module = argv[argv.index("-m") + 1]
            return module.partition(".")[0] in _SCOPED_PACKAGES
        script = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c") else ""
        if not script:
            return False
        script = os.path.abspath(script)
        # The children run the worker package's folder as a script.
        return os.path.basename(script.rstrip(os.sep)) in _SCOPED_PACKAGES or self.covers("__main__", script)

    def _guard_path(self, function: Any) -> Any:
        absent = self.absent_paths

        def guarded(path: Any, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(path, int):
                text = os.fsdecode(os.fspath(path))
                text = os.path.abspath(text) if text else text
                if text != os.devnull and any(text == root or text.startswith(root + "/") for root in absent):
                    raise FileNotFoundError(errno.ENOENT, f"No such file or directory (on {self.name})", text)
            return function(path, *args, **kwargs)

        guarded.__name__ = getattr(function, "__name__", "guarded")
        return guarded

    # --- the modules ------------------------------------------------------------

    def _make_sys(self, real: types.ModuleType) -> types.ModuleType:
        return ViewModule(real, {"platform": "win32" if self.windows else "darwin"}, set())

    def _make_platform(self, real: types.ModuleType) -> types.ModuleType:
        system = "Windows" if self.windows else "Darwin"
        return ViewModule(real, {"system": lambda: system}, set())

    def _make_os(self, real: types.ModuleType) -> types.ModuleType:
        everywhere_else = {
            "memfd_create", "pidfd_open", "sched_getaffinity", "sched_setaffinity", "eventfd", "eventfd_read",
            "eventfd_write", "splice", "copy_file_range", "getrandom", "pipe2", "posix_fadvise", "posix_fallocate",
            "getxattr", "setxattr", "listxattr", "removexattr", "sched_setscheduler", "sched_getscheduler",
            "sched_setparam", "sched_getparam", "O_PATH", "O_TMPFILE", "O_DIRECT", "P_PIDFD", "waitid", "WNOWAIT",
            "WEXITED", "WSTOPPED", "WCONTINUED", "P_PID", "P_PGID", "P_ALL", "GRND_NONBLOCK", "GRND_RANDOM",
        }  # fmt: skip
        everywhere_else |= {name for name in dir(real) if name.startswith(("MFD_", "EFD_", "SPLICE_", "RWF_", "XATTR"))}
        if not self.windows:
            return ViewModule(real, {"path": self._make_path(real.path), **self._path_functions(real)}, everywhere_else)
        windows_lacks = everywhere_else | {
            "fork", "forkpty", "register_at_fork", "killpg", "getpgid", "setsid", "setpgid", "getpgrp", "getsid",
            "setpgrp", "wait", "wait3", "wait4", "WNOHANG", "WUNTRACED", "WIFSIGNALED", "WIFEXITED", "WEXITSTATUS",
            "WTERMSIG", "WIFSTOPPED", "WSTOPSIG", "WCOREDUMP", "WIFCONTINUED", "getuid", "geteuid", "getgid",
            "getegid", "getgroups", "setuid", "seteuid", "setgid", "setegid", "getresuid", "getresgid",
            "initgroups", "getloadavg", "sysconf", "sysconf_names", "confstr", "confstr_names", "fpathconf",
            "pathconf", "posix_spawn", "posix_spawnp", "nice", "getpriority", "setpriority", "mkfifo", "mknod",
            "sync", "openpty", "ttyname", "uname", "statvfs", "fstatvfs", "chown", "lchown", "fchown", "chroot",
            "pread", "pwrite", "preadv", "pwritev", "readv", "writev", "sendfile", "O_CLOEXEC", "O_NONBLOCK",
            "O_DIRECTORY", "O_NOFOLLOW", "O_NOCTTY", "O_SYNC", "O_DSYNC", "O_ASYNC", "O_NDELAY", "O_RSYNC",
            "sched_yield", "sched_get_priority_max", "sched_get_priority_min", "sched_rr_get_interval",
            "SCHED_OTHER", "SCHED_FIFO", "SCHED_RR", "SCHED_BATCH", "SCHED_IDLE", "SCHED_RESET_ON_FORK",
            "ctermid", "getlogin", "lockf", "F_LOCK", "F_TLOCK", "F_ULOCK", "F_TEST", "major", "minor", "makedev",
            "login_tty", "unshare", "setns", "grantpt", "posix_openpt", "ptsname", "unlockpt", "timerfd_create",
        }  # fmt: skip
        windows_lacks |= {name for name in dir(real) if name.startswith(("PRIO_", "POSIX_", "CLD_", "ST_", "RTLD_"))}

        def not_on_sockets(function: Any) -> Any:
            # Sockets are not C runtime fds on Windows: os.read, os.write and
            # os.set_blocking refuse them (WinError 10038 / EBADF).
            def checked(fd: int, *args: Any) -> Any:
                if _is_socket(fd):
                    raise OSError(errno.EBADF, f"Bad file descriptor: os.{function.__name__} on a socket (Windows)")
                return function(fd, *args)

            return checked

        def kill(pid: int, sig: int) -> None:
            # Windows: 0 and 1 are console events (CTRL_C_EVENT, CTRL_BREAK_EVENT),
            # anything else is TerminateProcess. os.kill(pid, 0) is no liveness check there.
            real.kill(pid, 2 if sig in (0, 1) else 9)

        def waitpid(pid: int, options: int) -> tuple[int, int]:
            raise OSError(errno.EBADF, "os.waitpid takes a process handle on Windows, not a pid")

        replaced = {
            "name": "nt",
            "path": self._make_path(real.path),
            "kill": kill,
            "waitpid": waitpid,
            **{name: not_on_sockets(getattr(real, name)) for name in ("read", "write", "set_blocking", "get_blocking")},
            **self._path_functions(real),
        }
        return ViewModule(real, replaced, windows_lacks)

    def _path_functions(self, real: types.ModuleType) -> dict[str, Any]:
        names = ("open", "stat", "lstat", "listdir", "scandir", "readlink", "access", "statvfs")
        return {name: self._guard_path(getattr(real, name)) for name in names if hasattr(real, name)}

    def _make_path(self, real: types.ModuleType) -> types.ModuleType:
        names = ("exists", "lexists", "isdir", "isfile", "islink", "getsize", "realpath")

        def answers_false(function: Any) -> Any:
            guarded = self._guard_path(function)

            def checked(path: Any, *args: Any, **kwargs: Any) -> Any:
                try:
                    return guarded(path, *args, **kwargs)
                except FileNotFoundError:
                    return False

            return checked

        replaced = {name: answers_false(getattr(real, name)) for name in names[:5]}
        replaced.update({name: self._guard_path(getattr(real, name)) for name in names[5:]})
        return ViewModule(real, replaced, set())

    def _make_socket(self, real: types.ModuleType) -> types.ModuleType:
        linux_only = {
            "SOCK_NONBLOCK", "SOCK_CLOEXEC", "SO_PASSCRED", "SO_PEERCRED", "SCM_CREDENTIALS", "MSG_CMSG_CLOEXEC",
            "AF_NETLINK", "AF_PACKET", "AF_ALG", "AF_VSOCK", "SO_BINDTODEVICE", "TCP_QUICKACK", "TCP_CORK",
            "SO_MARK", "SO_DOMAIN", "SO_PROTOCOL", "SO_PEERSEC", "SO_PASSSEC", "MSG_NOSIGNAL", "MSG_CONFIRM",
            "MSG_MORE", "MSG_ERRQUEUE", "MSG_FASTOPEN",
        }  # fmt: skip
        if not self.windows:
            macos_buffer = 4096  # Linux doubles it: 8 KiB, as macOS's Unix sockets have

            def socketpair(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
                pair = real.socketpair(*args, **kwargs)
                if pair[0].family == real.AF_UNIX:
                    for sock in pair:
                        sock.setsockopt(real.SOL_SOCKET, real.SO_SNDBUF, macos_buffer)
                        sock.setsockopt(real.SOL_SOCKET, real.SO_RCVBUF, macos_buffer)
                return pair

            return ViewModule(real, {"socketpair": socketpair}, linux_only)

        # Sockets stay the real class: trio takes only that (from_stdlib_socket),
        # so the view cannot take sendmsg/recvmsg off them; without AF_UNIX,
        # SCM_RIGHTS and CMSG_SPACE no path that needs them can be reached.
        # SO_EXCLUSIVEADDRUSE is Windows' alone, and Linux would refuse it.

        def socketpair(family: int = real.AF_INET, type: int = real.SOCK_STREAM, proto: int = 0) -> tuple[Any, Any]:
            # What Python does on Windows: a loopback TCP connection.
            if family not in (real.AF_INET, real.AF_INET6):
                raise OSError(errno.EAFNOSUPPORT, "Only AF_INET and AF_INET6 socket address families are supported")
            with real.socket(family, type, proto) as listener:
                listener.bind(("127.0.0.1" if family == real.AF_INET else "::1", 0))
                listener.listen()
                one = real.socket(family, type, proto)
                try:
                    one.connect(listener.getsockname()[:2])
                    two, _ = listener.accept()
                except BaseException:
                    one.close()
                    raise
            return one, two

        replaced = {"socketpair": socketpair}
        hidden = linux_only | {
            "AF_UNIX", "SCM_RIGHTS", "CMSG_LEN", "CMSG_SPACE", "send_fds", "recv_fds", "MSG_DONTWAIT", "SO_REUSEPORT",
            "sethostname", "MSG_EOR", "MSG_NOSIGNAL", "MSG_TRUNC", "MSG_CTRUNC", "SOCK_SEQPACKET",
        }  # fmt: skip
        return ViewModule(real, replaced, hidden)

    def _make_select(self, real: types.ModuleType) -> types.ModuleType:
        linux = {"epoll", "EPOLLIN", "EPOLLOUT", "EPOLLERR", "EPOLLHUP", "EPOLLET", "EPOLLONESHOT", "EPOLLEXCLUSIVE",
                 "EPOLLRDHUP", "EPOLLPRI", "EPOLLRDNORM", "EPOLLRDBAND", "EPOLLWRNORM", "EPOLLWRBAND",
                 "EPOLLMSG", "EPOLL_CLOEXEC"}  # fmt: skip
        if not self.windows:
            return ViewModule(real, {}, linux)

        def select(rlist: Any, wlist: Any, xlist: Any, timeout: float | None = None) -> Any:
            # Windows' select takes sockets only, at most 512 of them.
            fds = [_fileno(obj) for obj in (*rlist, *wlist, *xlist)]
            if len(fds) > 512:
                raise ValueError("too many file descriptors in select()")
            if not all(_is_socket(fd) for fd in fds):
                raise OSError(errno.ENOTSOCK, "[WinError 10038] select() on something that is not a socket")
            return real.select(rlist, wlist, xlist, timeout)

        hidden = linux | {name for name in dir(real) if name.startswith("POLL")} | {"poll", "PIPE_BUF", "devpoll"}
        return ViewModule(real, {"select": select}, hidden)

    def _make_selectors(self, real: types.ModuleType) -> types.ModuleType:
        if not self.windows:
            return ViewModule(real, {"DefaultSelector": real.PollSelector}, {"EpollSelector"})
        hidden = {"EpollSelector", "PollSelector", "DevpollSelector"}
        return ViewModule(real, {"DefaultSelector": real.SelectSelector}, hidden)

    def _make_signal(self, real: types.ModuleType) -> types.ModuleType:
        if not self.windows:
            linux = {"SIGRTMIN", "SIGRTMAX", "SIGPWR", "SIGSTKFLT", "SIGPOLL", "SIGCLD", "sigtimedwait",
                     "sigwaitinfo", "pidfd_send_signal"}  # fmt: skip
            return ViewModule(real, {}, linux)
        kept = {"SIGINT": 2, "SIGILL": 4, "SIGABRT": 22, "SIGFPE": 8, "SIGSEGV": 11, "SIGTERM": 15, "SIGBREAK": 21}
        # Linux's numbers for the calls that reach the real module; Windows' own
        # numbers differ only for SIGABRT (22 there, 6 here).
        to_linux = {22: int(real.SIGABRT), 21: 21}
        signals = enum.IntEnum("Signals", kept)  # type: ignore[misc]

        def checked(number: Any) -> int:
            if int(number) not in kept.values():
                raise ValueError("invalid signal value")
            return to_linux.get(int(number), int(number))

        replaced: dict[str, Any] = dict(kept)
        replaced.update(
            Signals=signals,
            CTRL_C_EVENT=0,
            CTRL_BREAK_EVENT=1,
            NSIG=23,
            signal=lambda number, handler: real.signal(checked(number), handler),
            getsignal=lambda number: real.getsignal(checked(number)),
            raise_signal=lambda number: real.raise_signal(checked(number)),
            valid_signals=lambda: set(signals),
        )
        hidden = {name for name in dir(real) if name.startswith("SIG") and not name.startswith("SIG_")}
        hidden |= {"alarm", "pause", "pthread_kill", "pthread_sigmask", "sigpending", "sigwait", "sigwaitinfo",
                   "sigtimedwait", "siginterrupt", "setitimer", "getitimer", "ITIMER_REAL", "ITIMER_VIRTUAL",
                   "ITIMER_PROF", "ItimerError", "SIG_BLOCK", "SIG_UNBLOCK", "SIG_SETMASK", "Sigmasks",
                   "pidfd_send_signal"}  # fmt: skip
        return ViewModule(real, replaced, hidden)

    def _make_subprocess(self, real: types.ModuleType) -> types.ModuleType:
        if not self.windows:
            return ViewModule(real, {}, set())

        def windows_keywords(kwargs: dict[str, Any]) -> dict[str, Any]:
            if kwargs.get("preexec_fn") is not None:
                raise ValueError("preexec_fn is not supported on Windows platforms")
            if kwargs.get("pass_fds"):
                raise ValueError("pass_fds is not supported on Windows")
            for ignored in ("start_new_session", "process_group", "user", "group", "extra_groups", "umask"):
                kwargs.pop(ignored, None)
            if not isinstance(kwargs.pop("creationflags", 0), int):
                raise TypeError("creationflags must be an int")
            kwargs.pop("startupinfo", None)
            return kwargs

        class Popen(real.Popen):  # type: ignore[name-defined,misc]
            """Windows' Popen: no pass_fds or preexec_fn; a kill is
            TerminateProcess(handle, 1), so a killed child's returncode is 1."""

            def __init__(self, args: Any, *more: Any, **kwargs: Any) -> None:
                super().__init__(args, *more, **windows_keywords(kwargs))

            @property
            def returncode(self) -> int | None:
                return self._view_returncode  # type: ignore[no-any-return]

            @returncode.setter
            def returncode(self, value: int | None) -> None:
                self._view_returncode = 1 if value is not None and value < 0 else value

            def send_signal(self, sig: int) -> None:
                if sig == 15:
                    self.kill()
                elif sig in (0, 1):
                    super().send_signal(2)
                else:
                    raise ValueError(f"Unsupported signal: {sig}")

            def terminate(self) -> None:
                super().send_signal(9)

            kill = terminate

        def with_windows_keywords(function: Any) -> Any:
            return lambda *args, **kwargs: function(*args, **windows_keywords(kwargs))

        replaced = {
            "Popen": Popen,
            "run": with_windows_keywords(real.run),
            "call": with_windows_keywords(real.call),
            "check_call": with_windows_keywords(real.check_call),
            "check_output": with_windows_keywords(real.check_output),
            "CREATE_NEW_PROCESS_GROUP": 0x200,
            "CREATE_NEW_CONSOLE": 0x10,
            "CREATE_NO_WINDOW": 0x08000000,
            "DETACHED_PROCESS": 0x8,
            "BELOW_NORMAL_PRIORITY_CLASS": 0x4000,
            "IDLE_PRIORITY_CLASS": 0x40,
        }
        return ViewModule(real, replaced, set())

    def _make_mmap(self, real: types.ModuleType) -> types.ModuleType:
        linux = {"MADV_POPULATE_READ", "MADV_POPULATE_WRITE", "MAP_POPULATE", "MADV_HUGEPAGE", "MADV_NOHUGEPAGE",
                 "MADV_DONTDUMP", "MADV_DODUMP", "MADV_REMOVE", "MADV_HWPOISON", "MADV_MERGEABLE",
                 "MADV_UNMERGEABLE", "MADV_DONTFORK", "MADV_DOFORK", "MAP_DENYWRITE", "MAP_EXECUTABLE",
                 "MAP_STACK"}  # fmt: skip
        if not self.windows:
            return ViewModule(real, {}, linux)

        class mmap(real.mmap):  # type: ignore[name-defined,misc]
            """Windows' mmap(fileno, length, tagname=None, access=..., offset=0):
            no flags, prot or madvise."""

            madvise = _hidden_property("madvise")

            def __new__(cls, fileno: int, length: int, *args: Any, **kwargs: Any) -> Any:
                if args and not isinstance(args[0], str | None) or {"flags", "prot", "trackfd"} & set(kwargs):
                    raise TypeError("mmap on Windows takes (fileno, length, tagname=None, access=..., offset=0)")
                kwargs.pop("tagname", None)
                return super().__new__(cls, fileno, length, **kwargs)

        hidden = linux | {name for name in dir(real) if name.startswith(("MAP_", "PROT_", "MADV_"))}
        return ViewModule(real, {"mmap": mmap}, hidden)

    def _make_psutil(self, real: types.ModuleType) -> types.ModuleType:
        fields = [*real.Process().memory_info()._fields, "uss"]
        fullmem = collections.namedtuple("pfullmem", fields)  # type: ignore[misc]
        hidden_methods = {"rlimit"} | ({"num_fds"} if self.windows else {"cpu_affinity"})  # not there

        class Process(real.Process):  # type: ignore[name-defined,misc]
            """psutil's Process as it is off Linux: memory_full_info has USS but no PSS."""

            def memory_full_info(self) -> Any:
                full = super().memory_full_info()
                return fullmem(*(getattr(full, name) for name in fields))

            def children(self, recursive: bool = False) -> list[Any]:
                found = []
                for child in super().children(recursive=recursive):
                    try:
                        found.append(Process(child.pid))
                    except real.NoSuchProcess:
                        pass
                return found

        for name in hidden_methods:
            setattr(Process, name, _hidden_property(name))
        return ViewModule(real, {"Process": Process}, set())

    def _make_ctypes(self, real: types.ModuleType) -> types.ModuleType:
        linux_functions = {"prctl", "memfd_create", "pidfd_open", "sched_getaffinity", "eventfd"}
        windows = self.windows

        class CDLL(real.CDLL):  # type: ignore[name-defined,misc]
            def __init__(self, name: str | None, *args: Any, **kwargs: Any) -> None:
                if windows and name is None:
                    raise TypeError("LoadLibrary() argument 1 must be str, not None")
                super().__init__(name, *args, **kwargs)

            def __getattr__(self, name: str) -> Any:
                if name in linux_functions:
                    raise AttributeError(f"{name} is not in this platform's C library")
                return super().__getattr__(name)

            def __getitem__(self, name: Any) -> Any:
                if name in linux_functions:
                    raise AttributeError(f"{name} is not in this platform's C library")
                return super().__getitem__(name)

        return ViewModule(real, {"CDLL": CDLL}, set())

    def _make_importlib(self, real: types.ModuleType) -> types.ModuleType:
        def import_module(name: str, package: str | None = None) -> types.ModuleType:
            if not name.startswith("."):
                top = name.partition(".")[0]
                if top in self.absent_modules:
                    raise ModuleNotFoundError(f"No module named {top!r}", name=top)
                if name in self.modules:
                    real.import_module(name)
                    return self.modules[name]
            return real.import_module(name, package)  # type: ignore[no-any-return]

        return ViewModule(real, {"import_module": import_module}, set())

    def _make_fcntl(self, real: types.ModuleType) -> types.ModuleType:  # macOS only
        linux = {name for name in dir(real) if name.startswith(("F_SEAL_", "F_OFD_"))}
        linux |= {"F_ADD_SEALS", "F_GET_SEALS", "F_SETPIPE_SZ", "F_GETPIPE_SZ", "F_NOTIFY", "F_SETLEASE", "F_GETLEASE"}
        return ViewModule(real, {}, linux)

    def _make__posixshmem(self, real: types.ModuleType) -> types.ModuleType:  # macOS only
        def shm_open(path: str, flags: int, mode: int = 0o777) -> int:
            if len(os.fsencode(path)) > 31:  # PSHMNAMLEN
                raise OSError(errno.ENAMETOOLONG, "File name too long", path)
            return real.shm_open(path, flags, mode)  # type: ignore[no-any-return]

        return ViewModule(real, {"shm_open": shm_open}, set())


def install_from_environment() -> View | None:
    name = os.environ.get("TPF_PLATFORM_VIEW")
    if not name:
        return None
    global _installed
    _installed = View(name)
    _installed.install()
    return _installed

"""Temporary files to remove when a run fails, is interrupted or is terminated.

Every temporary file rnntool creates (``open_output``'s and ``atomic_file``'s
``.rnntool-*.part`` files, ``DumpWriter``'s ``.rnntool-*.h5.part``) is created by
:func:`create_temp`, which puts it in this registry *before* the file exists,
and leaves the registry when it has been renamed into place or removed. What is
still registered is removed:

* by the code that created it, on any exception (``except BaseException``);
* at interpreter exit (an ``atexit`` hook), e.g. a ``DumpWriter`` never closed,
  or a ``KeyboardInterrupt`` nobody caught;
* on SIGINT, SIGTERM or SIGHUP in the command line (:func:`install_cli_handlers`:
  files removed, one line, exit 128 + the signal number at once);
* on SIGTERM or SIGHUP in a library user's program (a
  training script writing a dump), when a file is registered from the main
  thread while that signal's handler is ``SIG_DFL``, a handler is installed that
  removes every registered file, restores ``SIG_DFL`` and sends the signal
  again, so the process still dies by that signal; it is uninstalled (back to
  ``SIG_DFL``, unless someone else replaced it meanwhile) when the registry
  empties. A program that installed its own handler keeps it; rnntool does not
  chain to it, and its files are removed at exit or by the writer's own
  exception handling.

Only SIGKILL (or a crash of the interpreter) can leave a ``.part`` file behind.
Forked children start with an empty registry, so they never remove their
parent's files.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import signal
import threading

__all__ = [
    "Terminated", "register", "unregister", "discard", "remove_all", "create_temp",
    "install_cli_handlers", "install_startup_handlers", "registered",
]

# path -> pid that registered it (a forked child must never remove its parent's files).
_paths: dict[str, int] = {}
_lock = threading.Lock()
# Signals whose handler we installed for library use: signum -> our handler.
_library_handlers: dict[int, object] = {}
_cli_mode = False
_LIBRARY_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


class Terminated(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an "Error"
    """SIGTERM or SIGHUP arrived (CLI mode): unwind like ``KeyboardInterrupt`` does.

    ``signum`` is the signal; ``exit_code`` is ``128 + signum`` (143 for SIGTERM).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return f"terminated by {signal.Signals(self.signum).name}"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def registered() -> list[str]:
    """The paths registered by this process (a copy)."""
    pid = os.getpid()
    return [p for p, owner in list(_paths.items()) if owner == pid]


def register(path: str | os.PathLike) -> str:
    """Remember ``path`` for removal on failure, exit or SIGTERM/SIGHUP; returns it as a str.

    From the main thread, outside CLI mode, this also installs the library
    SIGTERM/SIGHUP handler where that signal's handler is ``SIG_DFL``.
    """
    path = os.fspath(path)
    with _lock:
        _paths[path] = os.getpid()
    if not _cli_mode and _in_main_thread():
        _install_library_handlers()
    return path


def unregister(path: str | os.PathLike) -> None:
    """Forget ``path`` (it was renamed into place, or removed). Never raises."""
    with _lock:
        _paths.pop(os.fspath(path), None)
        empty = not _paths
    if empty and _library_handlers and _in_main_thread():
        _uninstall_library_handlers()


def discard(path: str | os.PathLike) -> None:
    """Remove the file at ``path`` if it is there, and forget it. Never raises OSError."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    unregister(path)


def remove_all() -> None:
    """Remove every file this process registered (signal handlers and atexit call this).

    Takes no lock (a signal handler may run while the main thread holds it);
    errors are ignored.
    """
    pid = os.getpid()
    for path, owner in list(_paths.items()):
        if owner == pid:
            with contextlib.suppress(OSError):
                os.unlink(path)
            _paths.pop(path, None)


def create_temp(directory: str, suffix: str = ".part", prefix: str = ".rnntool-",
                mode: int = 0o600) -> tuple[int, str]:
    """Create a new temporary file in ``directory``; returns ``(fd, path)``, fd opened O_RDWR.

    The path is registered *before* the file is created (O_CREAT|O_EXCL|O_NOFOLLOW,
    so nothing that already exists is ever opened), so there is no moment at which
    the file exists unregistered. Raises OSError (the name is then unregistered).
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(8)}{suffix}")
        register(path)
        try:
            fd = os.open(path, flags, mode)
        except FileExistsError:
            unregister(path)  # someone else's file: never remove it
            continue
        except BaseException:
            unregister(path)
            raise
        return fd, path
    raise FileExistsError(f"{directory}: cannot find an unused temporary file name")


# --------------------------------------------------------------------------- library handlers
def _library_handler(signum, frame) -> None:
    """Remove our temporary files, then die by the signal as the program would have."""
    remove_all()
    signal.signal(signum, signal.SIG_DFL)
    _library_handlers.pop(signum, None)
    signal.raise_signal(signum)


def _install_library_handlers() -> None:
    for signum in _LIBRARY_SIGNALS:
        if signum in _library_handlers:
            continue
        try:
            if signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, _library_handler)
                _library_handlers[signum] = _library_handler
        except (ValueError, OSError):  # not the main thread of the main interpreter
            return


def _uninstall_library_handlers() -> None:
    for signum in list(_library_handlers):
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signum) is _library_handler:
                signal.signal(signum, signal.SIG_DFL)
        _library_handlers.pop(signum, None)


# --------------------------------------------------------------------------- CLI handlers
_CLI_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, n))


def _say(signum: int) -> None:
    """One line on stderr, from a signal handler: ``rnntool: interrupted`` (SIGINT) or
    ``rnntool: terminated``. On a terminal the current line (a progress bar) is
    cleared first and the cursor shown again."""
    word = "interrupted" if signum == signal.SIGINT else "terminated"
    with contextlib.suppress(OSError):
        prefix = b"\r\x1b[2K\x1b[?25h" if os.isatty(2) else b""
        os.write(2, prefix + f"rnntool: {word}\n".encode())


def _exit_quietly(signum, frame) -> None:
    """Remove our temporary files and exit at once, silently, with 128 + signum."""
    remove_all()
    os._exit(128 + signum)


def _exit_now(signum, frame) -> None:
    """Remove our temporary files, say why, and exit at once with 128 + signum."""
    remove_all()
    _say(signum)
    os._exit(128 + signum)


def _raise_handler(signum, frame) -> None:
    """First signal: raise (KeyboardInterrupt for SIGINT, else Terminated) so every
    cleanup path runs; a second signal while that unwinds exits at once."""
    for s in _CLI_SIGNALS:
        signal.signal(s, _exit_quietly)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _install(handler) -> None:
    global _cli_mode
    if not _in_main_thread():
        return
    _cli_mode = True
    _uninstall_library_handlers()
    for s in _CLI_SIGNALS:
        signal.signal(s, handler)


def install_startup_handlers() -> None:
    """SIGINT, SIGTERM, SIGHUP: remove registered files and exit at once with 128 +
    signum, silently. For the CLI's start-up (imports, argument parsing), before a
    command runs. Main thread only (does nothing elsewhere)."""
    _install(_exit_quietly)


def install_cli_handlers(unwind: bool = False) -> None:
    """Signal handling while a CLI command runs. Main thread only (else does nothing).

    Default (``unwind=False``): SIGINT, SIGTERM and SIGHUP remove every registered
    temporary file, print ``rnntool: interrupted`` (SIGINT) or ``rnntool:
    terminated`` on stderr, and end the process at once with 128 + signum (130,
    143, 129) -- whatever the main thread is doing, even inside a C extension's
    callback, where an exception raised by a signal handler turns into a
    SystemError traceback (h5py's visit callbacks) or std::terminate (pybind11
    callbacks, e.g. during ``import torch``). Nothing else needs unwinding: the
    registry holds every file rnntool creates, and helper threads die with it.

    ``unwind=True``: the first signal raises instead (KeyboardInterrupt for
    SIGINT, :class:`Terminated` otherwise) so ``except``/``finally`` clauses run;
    the caller prints the line and exits with ``128 + signum``. A second signal
    while that unwinds exits at once, silently. Subject to the hazard above.
    """
    _install(_raise_handler if unwind else _exit_now)


def _after_fork_in_child() -> None:
    global _lock
    _paths.clear()
    _lock = threading.Lock()


atexit.register(remove_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

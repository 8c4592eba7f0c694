"""Safe runs: one run per work folder, short locks for the output's shared files, and
SIGINT/SIGTERM that stop a run promptly and cleanly.

* :class:`WorkFolderLock` holds ``fcntl.flock`` on ``<work_dir>/.keyprep.lock`` for the whole
  run: a second run on the same work folder stops at once (exit 75) instead of sharing
  Nipype's cache with the first (which gave false errors, crashed nodes and lost outputs).
* :func:`output_lock` serialises, for a moment, the runs that write the same dataset-level
  files of one output folder (``dataset_description.json``, the label tables, the citation
  files, the group tables). Those files are also written atomically (temporary file, then
  rename), so a reader never sees half a file.
* :class:`Interruptions` turns SIGINT and SIGTERM into :class:`RunInterrupted` in the main
  thread (exit 130 or 143), stops Nipype at the next node boundary (its status callback),
  ends the worker processes, and, should the main thread be stuck in a long C call
  (ITK, torch), ends the process itself after :attr:`Interruptions.grace_s` seconds. Outputs
  are written atomically, so whatever was written stays valid, and a rerun with the same
  work folder resumes.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..pipeline.errors import EXIT_LOCKED, KeyprepError

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ['Interruptions', 'RunInterrupted', 'WorkFolderLock', 'descendants',
           'drop_interrupt_crash_files', 'output_lock', 'terminate_descendants']

LOGGER = logging.getLogger('keyprep')

#: errnos of a lock held by someone else (flock with LOCK_NB)
_BUSY = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})
#: descriptors of the locks this process holds: a forked worker closes its copies, so that
#: a worker left behind by a killed run never keeps the work folder locked
_HELD_FDS: set[int] = set()


class WorkFolderLock:
    """An exclusive, non-blocking ``flock`` on ``<folder>/.keyprep.lock``, held until
    :meth:`release` (or the end of the process: the kernel releases it even after
    ``kill -9``, so a stale lock file never blocks a later run).

    A folder whose file system cannot lock (some network file systems) is used unlocked,
    with a warning.

    >>> lock = WorkFolderLock(tmp_path).acquire()
    >>> WorkFolderLock(tmp_path).acquire()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    keyprep.pipeline.errors.KeyprepError: the work folder ... is in use by another keyprep run ...
    >>> lock.release()
    """

    name = '.keyprep.lock'

    def __init__(self, folder: Path, what: str = 'the work folder'):
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / self.name

    def acquire(self) -> WorkFolderLock:
        if fcntl is None:  # pragma: no cover
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _BUSY:
                try:
                    holder = os.pread(fd, 400, 0).decode('utf-8', 'replace').strip()
                except OSError:
                    holder = ''
                os.close(fd)
                raise KeyprepError(
                    f'{self.what} {self.folder} is in use by another keyprep run'
                    + (f' ({holder})' if holder else '') + '; wait for it to end, or give '
                    'this run a work folder of its own (-w)', EXIT_LOCKED) from None
            os.close(fd)
            LOGGER.warning('cannot lock %s (%s): another run on the same work folder would '
                           'not be detected', self.path, exc.strerror or exc)
            return self
        self._fd = fd
        _HELD_FDS.add(fd)
        info = (f'pid {os.getpid()} on {socket.gethostname()}, started '
                f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n').encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
        except OSError:
            pass
        return self

    def release(self) -> None:
        if self._fd is not None:
            _HELD_FDS.discard(self._fd)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


@contextmanager
def output_lock(folder: Path, timeout_s: float = 120.0):
    """Hold an exclusive ``flock`` on the output folder itself (no file is added to the
    derivatives) while a block writes its shared files; other keyprep runs wait for it
    (up to ``timeout_s``, then go on with a warning: the writes are atomic anyway)."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            fd = None
    locked = False
    if fd is not None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except OSError as exc:
                if exc.errno not in _BUSY:
                    break  # cannot lock here (network file system): atomic writes only
                if time.monotonic() > deadline:
                    LOGGER.warning('output folder %s stayed locked by another run for %.0f s; '
                                   'writing its shared files anyway', folder, timeout_s)
                    break
                time.sleep(0.05)
    try:
        yield
    finally:
        if fd is not None:
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# Interruptions


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the run stops; exit code 128 + the signal number (130, 143)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def descendants(pid: int | None = None) -> list[int]:
    """Process ids of every descendant of ``pid`` (default: this process), from ``/proc``
    (empty where there is none)."""
    pid = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir('/proc')
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat', 'rb') as fh:
                stat = fh.read()
            ppid = int(stat[stat.rindex(b')') + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def terminate_descendants(timeout_s: float = 3.0) -> int:
    """SIGTERM to every descendant process (Nipype's workers and what they started), then
    SIGKILL to those still there after ``timeout_s``; the number of processes signalled."""
    pids = descendants()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + timeout_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _running(p)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(pids)


def _running(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap our own children
    except ChildProcessError:
        pass
    except OSError:
        return False
    try:
        with open(f'/proc/{pid}/stat', 'rb') as fh:
            stat = fh.read()
        return stat[stat.rindex(b')') + 2:][:1] not in (b'Z', b'X')
    except (OSError, ValueError):
        return False


def drop_interrupt_crash_files(folders) -> list[Path]:
    """Remove the crash files that an interruption caused (a node stopped by
    :class:`RunInterrupted` is not a failed node); return them."""
    dropped = []
    for folder in folders:
        for f in Path(folder).glob('crash-*'):
            try:
                text = f.read_text(errors='replace')
            except OSError:
                continue
            if 'RunInterrupted' in text or 'KeyboardInterrupt' in text:
                f.unlink(missing_ok=True)
                dropped.append(f)
    return dropped


_ACTIVE: Interruptions | None = None


def _after_fork_in_child() -> None:
    """A worker forked during a run (Nipype's MultiProc) closes its copies of the run's
    locks (closing, not unlocking: the run keeps them) and leaves interruptions to the main
    process: SIGINT (a Ctrl-C reaches the whole process group) is ignored, SIGTERM (what
    the main process sends to end it) ends it at once, even inside C code, and it gets
    SIGTERM when the main process dies (``kill -9``, the OOM killer): no worker outlives
    its run to go on writing into the work folder."""
    global _ACTIVE
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()
    active, _ACTIVE = _ACTIVE, None
    if active is None:
        return
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except (ValueError, OSError):  # pragma: no cover - not the main thread
        pass
    _die_with_parent(active._pid)


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM to this process when its parent ends (``PR_SET_PDEATHSIG``)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - elsewhere: the main process ends its workers itself
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(128 + signal.SIGTERM)


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Interruptions:
    """SIGINT and SIGTERM during a run (a context manager; a no-op outside the main thread).

    The first signal raises :class:`RunInterrupted` in the main thread and makes
    :meth:`status_callback` (given to Nipype) raise it again at the next node boundary, so
    a node that swallowed it (Nipype records every exception of an interface as a node
    failure) does not let the run go on. A watcher thread, woken by the signal itself
    (``signal.set_wakeup_fd``, so also while the main thread is inside C code), ends the
    worker processes and the process (exit 128 + signal) when the main thread has not
    finished within ``grace_s`` seconds, or at once on a second signal.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, grace_s: float = 10.0, keep_armed: bool = False):
        self.grace_s = grace_s
        self.keep_armed = keep_armed  # the console script: the watcher also covers the exit
        self.signum: int | None = None
        self._installed = False

    # -- main thread --------------------------------------------------------------------------
    def __enter__(self) -> Interruptions:
        global _ACTIVE
        if threading.current_thread() is not threading.main_thread():
            return self
        self._pid = os.getpid()
        self._rsock, self._wsock = socket.socketpair()
        self._wsock.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._wsock.fileno(), warn_on_full_buffer=False)
        self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        self._disarmed = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name='keyprep-signals',
                                         daemon=True)
        self._watcher.start()
        self._installed = True
        _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        if not self._installed:
            return
        _ACTIVE = None
        self._installed = False
        for s, old in self._old.items():
            signal.signal(s, old)
        signal.set_wakeup_fd(self._old_wakeup)
        if self.signum is None or not self.keep_armed:
            self._disarmed.set()
            try:
                self._wsock.send(b'\0')  # wake the watcher so that it ends
            except OSError:
                pass

    def _handler(self, signum, frame):
        if os.getpid() != self._pid:  # a child forked without the at-fork hook
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signum is not None:
            return  # a second signal: the watcher ends the process
        self.signum = signum
        # Nipype logs the node it interrupts as a crash, with a traceback, and the futures of
        # the workers ended below as broken: neither is a failure
        for name in ('nipype.workflow', 'nipype.interface', 'nipype.utils',
                     'concurrent.futures'):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        raise RunInterrupted(signum)

    def status_callback(self, node, status) -> None:
        """Nipype's ``status_callback``: after a signal, no node starts and no result is
        taken as a failure."""
        if self.signum is not None:
            raise RunInterrupted(self.signum)

    @property
    def interrupted(self) -> bool:
        return self.signum is not None

    # -- watcher thread -----------------------------------------------------------------------
    def _watch(self) -> None:
        signals = 0
        signum = None
        deadline = None
        while not self._disarmed.is_set():
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._rsock.settimeout(timeout)
            try:
                data = self._rsock.recv(64)
            except socket.timeout:
                data = b''
            except OSError:
                return
            if self._disarmed.is_set():
                break
            for byte in data:
                if byte in self.SIGNALS:
                    signals += 1
                    signum = byte
                    deadline = time.monotonic() + (self.grace_s if signals == 1 else 0.0)
            if deadline is not None and time.monotonic() >= deadline:
                self._hard_exit(signum)
        self._rsock.close()
        self._wsock.close()

    def _hard_exit(self, signum: int) -> None:
        name = signal.Signals(signum).name
        try:
            LOGGER.error('%s: the run did not stop within %.0f s; ending it and its worker '
                         'processes now. Rerun with the same --work-dir to resume', name,
                         self.grace_s)
        except Exception:  # noqa: BLE001 - logging must not keep the process alive
            pass
        terminate_descendants(timeout_s=1.0)
        os._exit(128 + signum)

"""Progress of a workflow run on the terminal, without flooding it.

Nipype calls :meth:`Progress.status_callback` (``plugin_args={'status_callback': ...}``)
in the main process with ``'start'``, ``'end'`` or ``'exception'`` for each node (MultiProc,
Linear and the batch plugins such as SLURM; MultiProc calls only ``'end'`` for a node that
is cached or runs in the main process). From that:

* at default verbosity: one line when each participant (processing group: a subject, or a
  subject's session) and the target's preparation start and finish, and a progress line
  (nodes done / total, cached, failed, running, elapsed) at most every ``interval``
  seconds when nodes finish, or after ``heartbeat`` seconds without any line (a long
  node), naming the node that has run longest;
* with ``-v`` also one line per node that ran (name and time); cached nodes are counted,
  not listed (a rerun reuses hundreds of them);
* ``-vv`` keeps Nipype's own log as well (set in :func:`keyprep.bids_app.run._run_workflow`).

A node is *cached* when its result file is older than the node's start (or the run's, when
Nipype reports no start): Nipype reused it. That costs one ``stat`` per node.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable

__all__ = ['HEARTBEAT_S', 'INTERVAL_S', 'Progress']

LOGGER = logging.getLogger('keyprep')

#: Progress lines at most this often while nodes finish (seconds).
INTERVAL_S = 30.0
#: A progress line after this long without any line (a long node is running).
HEARTBEAT_S = 300.0

_GROUP_WF = re.compile(r'^sub_([A-Za-z0-9]+)(?:_ses_([A-Za-z0-9]+))?(?:_anat)?_wf$')
_TARGET = 'target'


def _unit_of(rel_name: str) -> str:
    """``sub-01`` / ``sub-01 ses-a`` for a node of a participant's workflows, else the
    target's preparation (which includes the groupwise template)."""
    m = _GROUP_WF.match(rel_name.split('.', 1)[0])
    if not m:
        return _TARGET
    return f'sub-{m.group(1)}' + (f' ses-{m.group(2)}' if m.group(2) else '')


def _minutes(seconds: float) -> str:
    if seconds < 10:
        return f'{seconds:.1f} s'
    return f'{seconds:.0f} s' if seconds < 90 else f'{seconds / 60:.1f} min'


class Progress:
    """Progress reporting of one ``wf.run``; use as a context manager around it.

    Parameters
    ----------
    wf
        The workflow about to run (its nodes are counted, Nipype's identity nodes excluded:
        Nipype removes them from the graph it runs).
    verbose
        ``-v`` count: from 1, one line per node that ran.
    then
        Another status callback, called first (the SIGINT/SIGTERM guard).
    plugin
        The Nipype plugin: ``Linear`` also reports the nodes it skips after a failure (as
        ``'end'`` without ``'start'``); they are not counted as done.
    """

    def __init__(self, wf, verbose: int = 0, then: Callable | None = None,
                 interval: float = INTERVAL_S, heartbeat: float = HEARTBEAT_S,
                 plugin: str = 'MultiProc'):
        from nipype.interfaces.utility import IdentityInterface
        from nipype.pipeline.engine import JoinNode

        self.verbose = verbose
        self.linear = plugin == 'Linear'
        self.then = then
        self.interval = interval
        self.heartbeat = heartbeat
        self.prefix = wf.name + '.'
        self.totals: dict[str, int] = {}
        for name in wf.list_node_names():
            node = wf.get_node(name)
            if node is None or (isinstance(node.interface, IdentityInterface)
                                and not isinstance(node, JoinNode)):
                continue
            unit = _unit_of(name)
            self.totals[unit] = self.totals.get(unit, 0) + 1
        self.total = sum(self.totals.values())
        self.done: dict[str, int] = dict.fromkeys(self.totals, 0)
        self.failed: dict[str, int] = dict.fromkeys(self.totals, 0)
        self.cached = 0
        self.running: dict[str, float] = {}  # node name -> start (monotonic)
        self.running_wall: dict[str, float] = {}  # node name -> start (time.time)
        self.unit_start: dict[str, float] = {}
        self.finished_units: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._broken = False

    # -- run ------------------------------------------------------------------------------
    def __enter__(self) -> Progress:
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.last_line = self.t0
        units = sorted(u for u in self.totals if u != _TARGET)
        LOGGER.info('workflow: %d nodes (%d participant%s%s); progress every %.0f s at most',
                    self.total, len(units), '' if len(units) == 1 else 's',
                    ' and the target' if _TARGET in self.totals else '', self.interval)
        if self.heartbeat > 0:
            self._thread = threading.Thread(target=self._beat, name='keyprep-progress',
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._broken or (exc_type is not None and issubclass(exc_type, KeyboardInterrupt)):
            return  # interrupted: the run says so itself
        with self._lock:
            for unit in sorted(self.totals):
                if unit in self.finished_units or not self.totals[unit]:
                    continue
                if unit not in self.unit_start:
                    LOGGER.info('%s: not run (%d nodes; they need a failed node)', unit,
                                self.totals[unit])
                    continue
                left = self.totals[unit] - self.done[unit] - self.failed[unit]
                LOGGER.info('%s: stopped after %s: %d of %d nodes done, %d failed, %d not run '
                            '(they need a failed node)', unit,
                            _minutes(time.monotonic() - self.unit_start[unit]),
                            self.done[unit], self.totals[unit], self.failed[unit], left)
            self._line('workflow finished')

    # -- Nipype ---------------------------------------------------------------------------
    def status_callback(self, node, status) -> None:
        """Nipype's ``status_callback``; never lets a reporting problem stop the run."""
        if self.then is not None:
            self.then(node, status)
        if self._broken:
            return
        try:
            with self._lock:
                self._update(node, status)
        except Exception as exc:  # noqa: BLE001  (progress must never break a run)
            self._broken = True
            LOGGER.debug('progress reporting stopped: %s', exc)

    def _update(self, node, status: str) -> None:
        name = node.fullname
        if name.startswith(self.prefix):
            name = name[len(self.prefix):]
        unit = _unit_of(name)
        now = time.monotonic()
        if unit not in self.totals:  # a node the count did not see: count it now
            self.totals[unit] = self.done[unit] = self.failed[unit] = 0
        if unit not in self.unit_start:
            self.unit_start[unit] = now
            LOGGER.info('%s: started (%d nodes)', unit, self.totals[unit])
        if status == 'start':
            self.running[name] = now
            self.running_wall[name] = time.time()
            return
        started = self.running.pop(name, None)
        started_wall = self.running_wall.pop(name, self.wall0)
        if started is None and self.linear:
            return  # Linear reports the nodes that a failure kept from running as 'end'
        if status == 'exception':
            self.failed[unit] += 1
            LOGGER.info('%s: node failed: %s', unit, name)
        else:
            self.done[unit] += 1
            if self._is_cached(node, started_wall):
                self.cached += 1
            elif self.verbose >= 1:
                took = now - started if started is not None else self._runtime(node)
                LOGGER.info('node done: %s%s', name,
                            f' ({_minutes(took)})' if took is not None else '')
        if self.done[unit] + self.failed[unit] >= self.totals[unit] and \
                unit not in self.finished_units:
            self.finished_units.add(unit)
            LOGGER.info('%s: finished in %s (%d nodes, %d failed)', unit,
                        _minutes(now - self.unit_start[unit]), self.done[unit],
                        self.failed[unit])
        if now - self.last_line >= self.interval:
            self._line('progress')

    @staticmethod
    def _is_cached(node, since: float) -> bool:
        """Its result file predates ``since`` (the node's start, else the run's): Nipype
        reused it."""
        if getattr(node, 'base_dir', None) is None:
            return False
        result = os.path.join(node.output_dir(), f'result_{node.name}.pklz')
        try:
            return os.stat(result).st_mtime < since
        except OSError:
            return False

    @staticmethod
    def _runtime(node) -> float | None:
        """The run time Nipype recorded for a node that reported no start (MultiProc runs
        some nodes in the main process); ``None`` if it cannot be read."""
        try:
            return float(node.result.runtime.duration)
        except Exception:  # noqa: BLE001  (no result file, an old format...)
            return None

    # -- lines ----------------------------------------------------------------------------
    def _line(self, what: str) -> None:
        now = time.monotonic()
        self.last_line = now
        done, failed = sum(self.done.values()), sum(self.failed.values())
        longest = ''
        if self.running:
            name, start = min(self.running.items(), key=lambda kv: kv[1])
            longest = f' (longest: {name}, {_minutes(now - start)})'
        LOGGER.info('%s: %d/%d nodes done (%d cached), %d failed, %d running%s, %s elapsed',
                    what, done, self.total, self.cached, failed, len(self.running), longest,
                    _minutes(now - self.t0))

    def _beat(self) -> None:
        while not self._stop.wait(min(self.interval, self.heartbeat)):
            with self._lock:
                if time.monotonic() - self.last_line >= self.heartbeat:
                    self._line('progress')

"""Wall time, peak memory, devices and seeds: measured the same way for every engine."""

from __future__ import annotations

import os
import random
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

__all__ = ['Measurement', 'measure', 'resolve_device', 'rss_mb', 'seed_everything',
           'tune_allocator']


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open('/proc/self/statm') as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf('SC_PAGE_SIZE') / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class Measurement:
    """Filled by :func:`measure` when its block ends."""

    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    baseline_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None


@contextmanager
def measure(interval: float = 0.05, device: str = 'cpu'):
    """Measure wall time and the peak resident memory of this process during a block.

    A sampling thread reads the RSS every ``interval`` seconds (this also sees memory
    allocated by C++ libraries such as ITK, which ``tracemalloc`` would miss). On CUDA
    the peak allocated device memory is recorded too.

    >>> with measure() as m:
    ...     x = np.ones(10_000_000)
    >>> m.peak_rss_mb > m.baseline_rss_mb
    True
    """
    m = Measurement(baseline_rss_mb=rss_mb())
    m.peak_rss_mb = m.baseline_rss_mb
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            m.peak_rss_mb = max(m.peak_rss_mb, rss_mb())
            stop.wait(interval)

    cuda = device.startswith('cuda')
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        m.wall_s = time.perf_counter() - t0
        stop.set()
        thread.join()
        m.peak_rss_mb = max(m.peak_rss_mb, rss_mb())
        if cuda:
            import torch

            m.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20


def fast_bf16(device: str = 'cpu') -> bool:
    """Whether ``device`` runs bfloat16 convolutions natively (CUDA with bf16 support, or an x86
    CPU with AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than float32."""
    import torch

    if str(device).startswith('cuda'):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        with open('/proc/cpuinfo') as fh:
            for line in fh:
                if line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
                    return bool(flags & {'avx512_bf16', 'amx_bf16'})
    except OSError:
        pass
    return False


#: Numerical precisions of keyprep's torch networks ('auto' resolves to one of them).
PRECISIONS = ('fp32', 'bf16')


def resolve_precision(precision: str = 'auto', device: str = 'cpu') -> str:
    """Map ``auto|fp32|bf16`` to a concrete precision: 'auto' is bf16 where ``device`` runs it
    natively (:func:`fast_bf16`), fp32 elsewhere.

    >>> resolve_precision('fp32')
    'fp32'
    """
    if precision == 'auto':
        return 'bf16' if fast_bf16(str(device)) else 'fp32'
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', not {precision!r}")
    return precision


def autocast(device, precision: str):
    """The torch autocast context of a concrete ``precision`` on ``device`` (no-op for fp32)."""
    import torch

    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                          enabled=precision == 'bf16')


def resolve_device(device: str = 'auto') -> str:
    """Map ``auto|cpu|cuda[:N]`` to a concrete torch device string.

    >>> resolve_device('cpu')
    'cpu'
    """
    if device == 'cpu':
        return 'cpu'
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        has_cuda = False
    if device == 'auto':
        return 'cuda' if has_cuda else 'cpu'
    if device.startswith('cuda'):
        if not has_cuda:
            from .errors import UsageError

            raise UsageError('--device cuda was requested but no CUDA device is available')
        return device
    from .errors import UsageError

    raise UsageError(f'unknown device {device!r}; use auto, cpu or cuda')


#: glibc's ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks below this size come from glibc's heap, and freed ones stay there for reuse.
MMAP_THRESHOLD_BYTES = 1 << 30
#: Free memory at the top of the heap is given back to the system only above this size.
TRIM_THRESHOLD_BYTES = 2**31 - 1
_ALLOCATOR = {'tuned': None}


def tune_allocator() -> bool:
    """Let glibc's ``malloc`` keep and reuse freed blocks of up to 1 GiB in this process.

    torch and NumPy allocate their CPU tensors with ``malloc``. By default glibc serves every
    block above 32 MiB (a 96³ feature map of 10 channels) with a fresh ``mmap`` and unmaps it
    when freed, so the kernel zeroes and faults in every page again at each use: in one
    CARL instance optimisation at 1 mm (96³ working grid, 5 steps, one CPU thread,
    2026-12-07) 14-15 s of system time out of 77-84 s, against 3.3-3.5 s and 67-70 s with
    this setting, identical fields (``benchmarks/results/allocator/``). The cost: freed
    memory stays with the process (up to 2 GiB at the top of its heap) for reuse instead of
    going back to the system at once.

    Process-wide and idempotent; glibc only (elsewhere, or with ``KEYPREP_MALLOC_TUNING=0``
    in the environment, it changes nothing). Returns whether the setting is in force.
    """
    if _ALLOCATOR['tuned'] is not None:
        return _ALLOCATOR['tuned']
    tuned = False
    if os.environ.get('KEYPREP_MALLOC_TUNING', '1').strip().lower() not in ('0', 'off', 'false',
                                                                          'no'):
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
            mallopt = libc.mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            # both or neither: a high trim threshold alone (blocks still mmapped) was slower
            tuned = (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
                     and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
            tuned = False
    _ALLOCATOR['tuned'] = tuned
    return tuned


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch (all devices) and ANTs (through ``ANTS_RANDOM_SEED``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    os.environ['ANTS_RANDOM_SEED'] = str(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass

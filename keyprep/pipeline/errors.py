"""Errors that carry the documented exit code of the command line.

Exit codes (also in the README and ``keyprep --help``):

====  =====================================================================
code  meaning
====  =====================================================================
0     success
1     the workflow ran but at least one node failed (a crash file exists)
16    the input dataset failed BIDS validation
17    unknown analysis level
18    participant/session labels or BIDS filters selected nothing
64    usage error (bad option or value, output or work folder in the input
      dataset, --mem below what one node needs ...)
65    an input file is unusable (an image that is corrupt, truncated, 4-D,
      NaN, empty or of implausible geometry; a weights file that does not load)
66    a required input is missing (no anatomical image, target or weights file;
      the BIDS validator package bids-validator-deno)
73    the output or work folder cannot be created or written into
74    a write failed during the run (disk full, quota, file system turned
      read-only...)
75    the work folder is in use by another keyprep run (try again later)
130   interrupted by SIGINT (Ctrl-C); rerun with the same work folder to resume
143   stopped by SIGTERM; rerun with the same work folder to resume
====  =====================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED_NODES = 1
EXIT_VALIDATION = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NO_MATCH = 18
EXIT_USAGE = 64
EXIT_DATA = 65
EXIT_NO_INPUT = 66
EXIT_CANTCREAT = 73  # sysexits.h EX_CANTCREAT
EXIT_IOERR = 74  # sysexits.h EX_IOERR
EXIT_LOCKED = 75  # sysexits.h EX_TEMPFAIL
EXIT_SIGINT = 130  # 128 + SIGINT
EXIT_SIGTERM = 143  # 128 + SIGTERM

EXIT_CODES = {
    EXIT_OK: 'success',
    EXIT_FAILED_NODES: 'at least one workflow node failed (see crash files)',
    EXIT_VALIDATION: 'the input dataset failed BIDS validation',
    EXIT_UNKNOWN_LEVEL: 'unknown analysis level',
    EXIT_NO_MATCH: 'labels or BIDS filters selected nothing',
    EXIT_USAGE: 'usage error (also: output or work folder in the input dataset, --mem '
                'below what one node needs)',
    EXIT_DATA: 'an input image or weights file is unusable',
    EXIT_NO_INPUT: 'a required input is missing (also: the BIDS validator package)',
    EXIT_CANTCREAT: 'the output or work folder cannot be created or written into',
    EXIT_IOERR: 'a write failed during the run (disk full, quota, read-only file system)',
    EXIT_LOCKED: 'the work folder is in use by another keyprep run',
    EXIT_SIGINT: 'interrupted (SIGINT, Ctrl-C); rerun with the same work folder to resume',
    EXIT_SIGTERM: 'stopped (SIGTERM); rerun with the same work folder to resume',
}


class KeyprepError(Exception):
    """Base class of errors that end in one clear line and a documented exit code."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(KeyprepError):
    exit_code = EXIT_USAGE


class ValidationError(KeyprepError):
    exit_code = EXIT_VALIDATION


class NoMatchError(KeyprepError):
    exit_code = EXIT_NO_MATCH


class ImageError(KeyprepError):
    """An image that exists but cannot be used (corrupt, 4-D, NaN, empty...)."""

    exit_code = EXIT_DATA


class MissingInputError(KeyprepError):
    exit_code = EXIT_NO_INPUT


class WeightsError(KeyprepError):
    """A weights file that exists but is not a loadable keyprep weights file."""

    exit_code = EXIT_DATA


class CantCreateError(KeyprepError):
    """The output or work folder cannot be created, or is not writable (checked at
    start-up, before anything is written)."""

    exit_code = EXIT_CANTCREAT


class WriteError(KeyprepError):
    """A write failed during the run for a reason of the environment (disk full...)."""

    exit_code = EXIT_IOERR

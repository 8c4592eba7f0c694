#!/usr/bin/env python
"""Write ``requirements.lock``: every distribution keyprep (with its ``test`` extra) needs,
directly or transitively, pinned to the version installed in this environment.

    .venv/bin/python scripts/lock.py            # rewrite the lock from .venv
    .venv/bin/python scripts/lock.py --check    # exit 1 if the lock and .venv differ

The closure is read from the installed distributions' own metadata (``Requires-Dist`` with
their environment markers evaluated here, extras followed), so the lock holds what pip
would install on this platform (Linux, CPython 3.11, the CPU build of torch), nothing
else. ``scripts/install.sh``, ``scripts/install_keyprep.sh`` (Docker, CI) install through it.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LOCK = Path(__file__).resolve().parents[1] / 'requirements.lock'
ROOT = 'keyprep'
ROOT_EXTRAS = ('test',)


def closure(root: str = ROOT, extras=ROOT_EXTRAS) -> dict[str, str]:
    """``{canonical name: installed version}`` of everything ``root[extras]`` needs."""
    seen: dict[str, str] = {}
    todo = [(root, tuple(extras))]
    done: set[tuple[str, tuple]] = set()
    while todo:
        name, want = todo.pop()
        key = (canonicalize_name(name), want)
        if key in done:
            continue
        done.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            sys.exit(f'lock.py: {name} is required but not installed here')
        if canonicalize_name(name) != ROOT:
            # without the local label (2.13.0+cpu -> 2.13.0): a CUDA build of the same
            # release satisfies the pin too (install_keyprep.sh --torch-variant)
            seen[canonicalize_name(dist.metadata['Name'])] = dist.version.split('+')[0]
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{'extra': e} for e in want] or [{'extra': ''}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            todo.append((req.name, tuple(sorted(req.extras))))
    return dict(sorted(seen.items()))


def render(pins: dict[str, str]) -> str:
    head = ('# keyprep: every dependency pinned (keyprep[test] on Linux, CPython 3.11, CPU torch).\n'
            '# Written by scripts/lock.py from an environment installed with it; installed with\n'
            '# pip install -c requirements.lock (scripts/install.sh, scripts/install_keyprep.sh).\n')
    return head + ''.join(f'{name}=={version}\n' for name, version in pins.items())


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split('#', 1)[0].strip()
        if line:
            name, version = line.split('==')
            version = version.split('+')[0]
            pins[canonicalize_name(name)] = version
    return pins


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--check', action='store_true')
    opts = ap.parse_args(argv)
    pins = closure()
    if opts.check:
        old = read_lock()
        diff = sorted(set(old.items()) ^ set(pins.items()))
        for name, version in diff:
            print(f'{"lock" if old.get(name) == version else "here"}: {name}=={version}')
        return 1 if diff else 0
    LOCK.write_text(render(pins))
    print(f'lock.py: {len(pins)} distributions pinned in {LOCK.name}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

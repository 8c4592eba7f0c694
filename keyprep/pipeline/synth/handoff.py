"""Continue a label-network training run on a lent GPU machine, and bring it back.

``scripts/gpu_train.sh`` calls this module's verbs (see ``training/README.md``, "GPU recipe"):

``prepare`` (here)
    writes the gitignored carry folder (``.gpu_carry/``): the training anatomies as one
    label-map bundle (:mod:`.bundle`; the GPU machine has neither ``../shared`` nor the atlases),
    the installed nibabel without its tests (validation builds NIfTI images; the GPU machine
    has no nibabel; training alone needs none), and a manifest (the checkpoint's step and
    sha256). The run's own files (checkpoint, config, logs) travel as files of the working
    tree; they are copied into the carry folder only when the travelling tree stays within
    the device's 64 MiB with them.
``device`` (on the GPU machine, ``python3`` with the repository on ``PYTHONPATH``)
    copies the run to a scratch folder, resumes it with the CPU run's recipe and schedule on
    ``--device cuda`` for ``--max-minutes`` (the trainer checkpoints when it stops; a hard time
    limit interrupts it before the device's 10 minutes, and the last periodic checkpoint
    counts), then puts the checkpoint (in parts under 16 MiB), ``train_log.tsv``,
    ``val_log.tsv`` and the other run files under ``$OUT``.
``collect FILES_AT`` (here, with the CPU run stopped)
    reassembles the checkpoint, checks its digest, that it loads and that its step is past the
    installed one, and installs checkpoint and logs into the run folder (the replaced files are
    kept in ``.gpu_backup/backup-<time>/``). It refuses while a ``keyprep train synthseg`` for
    that folder is running.

Nothing here imports nibabel: the device verb runs on a machine without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Sequence

from ..weights import sha256_file

__all__ = ['split_file', 'join_parts', 'checkpoint_step', 'trainer_processes', 'travel_bytes',
           'prepare', 'device_run', 'package', 'collect', 'RECIPE_ARGS', 'PART_BYTES',
           'DEVICE_LIMIT_BYTES', 'main']

#: Largest file the device hands back is 16 MiB: parts stay well under it.
PART_BYTES = 15 * 2**20
#: The working tree (tracked + untracked-not-ignored + carried paths) that travels.
DEVICE_LIMIT_BYTES = 64 * 2**20
#: At most this many files come back from ``$OUT``.
MAX_OUT_FILES = 8

REPO = Path(__file__).resolve().parents[3]
CARRY = '.gpu_carry'
#: where ``collect`` keeps the files it replaces (gitignored, not carried)
BACKUP = '.gpu_backup'
RUN_DIR = 'training/synthseg-cpu-2mm'
LABEL_MAPS = '../shared/data/synthseg/training_label_maps'
BUNDLE_NAME = 'label_maps.npz'
NIBABEL_ZIP = 'nibabel-slim.zip'
#: The CPU run's recipe and schedule (``training/README.md``); the device run continues it.
EXTRA_ANATOMIES = ('icbm',)
RECIPE_ARGS: tuple[str, ...] = ('--extra-anatomies', *EXTRA_ANATOMIES, '--restart-step', '7500',
                                '--steps', '25000', '--precision', 'bf16', '--val-pose', 'header',
                                '--val-every', '2000')
#: The run's files that travel and come back (besides the checkpoint).
RUN_FILES = ('train_config.json', 'train_log.tsv', 'val_log.tsv')
CHECKPOINT = 'checkpoint.pt'


# ---------------------------------------------------------------------------- small helpers
def _log(msg: str) -> None:
    print(f'[gpu_train] {msg}', flush=True)


def split_file(path: str | Path, out_dir: str | Path, part_bytes: int = PART_BYTES,
               meta: dict | None = None) -> Path:
    """Cut ``path`` into ``<name>.partNN`` files of at most ``part_bytes`` in ``out_dir`` and
    write ``<name>.parts.json`` (sizes and sha256 of the whole and of each part, plus
    ``meta``); returns the manifest's path."""
    path, out_dir = Path(path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = path.stat().st_size
    n_parts = max(1, -(-size // part_bytes))
    if n_parts > 99:
        raise ValueError(f'{path}: {n_parts} parts of {part_bytes} bytes (at most 99)')
    parts = []
    with open(path, 'rb') as fh:
        for i in range(n_parts):
            data = fh.read(part_bytes)
            name = f'{path.name}.part{i:02d}'
            (out_dir / name).write_bytes(data)
            parts.append({'file': name, 'bytes': len(data),
                          'sha256': hashlib.sha256(data).hexdigest()})
    manifest = {'name': path.name, 'bytes': size, 'sha256': sha256_file(path), 'parts': parts,
                **(meta or {})}
    out = out_dir / f'{path.name}.parts.json'
    out.write_text(json.dumps(manifest, indent=1) + '\n')
    return out


def join_parts(manifest: str | Path, out_path: str | Path) -> Path:
    """Reassemble the file described by a ``<name>.parts.json`` (parts beside it), checking
    every part's and the whole file's size and sha256; written atomically."""
    manifest = Path(manifest)
    info = json.loads(manifest.read_text())
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + '.joining')
    whole = hashlib.sha256()
    try:
        with open(tmp, 'wb') as fh:
            for part in info['parts']:
                data = (manifest.parent / part['file']).read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                if len(data) != part['bytes'] or digest != part['sha256']:
                    raise ValueError(f"{part['file']}: size or sha256 differs from "
                                     f"{manifest.name}")
                whole.update(data)
                fh.write(data)
        if tmp.stat().st_size != info['bytes'] or whole.hexdigest() != info['sha256']:
            raise ValueError(f"{info['name']}: the reassembled file's size or sha256 differs")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def checkpoint_step(path: str | Path) -> int:
    """The step of a training checkpoint (loaded with ``weights_only=True``, on the CPU)."""
    import torch

    ckpt = torch.load(Path(path), map_location='cpu', weights_only=True)
    for key in ('model', 'optimiser', 'step', 'config'):
        if key not in ckpt:
            raise ValueError(f'{path} is not a training checkpoint (no {key!r})')
    return int(ckpt['step'])


def _cmd_output(cmdline: list[str]) -> str | None:
    """The ``--output`` of a ``keyprep train synthseg`` command line, else None."""
    trainer = ('keyprep-train', 'keyprep.bids_app.train')
    if 'synthseg' not in cmdline or not any(a == 'train' or a.endswith(trainer) for a in cmdline):
        return None
    for i, arg in enumerate(cmdline):
        if arg == '--output' and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if arg.startswith('--output='):
            return arg.split('=', 1)[1]
    return None


def trainer_processes(run_dir: str | Path) -> list[int]:
    """Process ids of running ``keyprep train synthseg`` commands whose ``--output`` is
    ``run_dir`` (read from ``/proc``; none where there is no ``/proc``)."""
    target = Path(run_dir).resolve()
    found = []
    proc = Path('/proc')
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / 'cmdline').read_bytes().decode(errors='replace').split('\0')
            output = _cmd_output([a for a in cmdline if a])
            if output is None:
                continue
            cwd = Path(os.readlink(entry / 'cwd'))
        except OSError:  # gone, or not ours to read
            continue
        if (cwd / output).resolve() == target:
            found.append(int(entry.name))
    return sorted(found)


def _git_files(repo: Path, *args: str) -> list[Path]:
    out = subprocess.run(['git', '-C', str(repo), 'ls-files', '-z', *args], check=True,
                         capture_output=True).stdout.decode()
    return [repo / p for p in out.split('\0') if p]


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    if path.is_dir():
        return sum(_size(p) for p in path.iterdir())
    return 0


def travel_bytes(repo: str | Path = REPO, carry: Sequence[str | Path] = ()) -> dict[str, int]:
    """Bytes of what the device receives: tracked files, untracked files git does not ignore,
    and the carried paths."""
    repo = Path(repo)
    tracked = sum(_size(p) for p in _git_files(repo) if p.exists() or p.is_symlink())
    untracked = sum(_size(p) for p in _git_files(repo, '--others', '--exclude-standard'))
    carried = sum(_size(repo / c) for c in carry)
    return {'tracked': tracked, 'untracked': untracked, 'carry': carried,
            'total': tracked + untracked + carried, 'limit': DEVICE_LIMIT_BYTES}


# ---------------------------------------------------------------------------- prepare (here)
def _slim_nibabel(out: Path) -> dict:
    """Zip the installed nibabel package without its tests (pure Python: it runs on the
    device's Python too); returns its version and size."""
    import nibabel

    pkg = Path(nibabel.__file__).parent
    tmp = out.with_name(out.name + '.tmp')
    with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_LZMA) as z:
        for path in sorted(pkg.rglob('*')):
            rel = path.relative_to(pkg.parent)
            if path.is_dir() or 'tests' in rel.parts or '__pycache__' in rel.parts:
                continue
            z.write(path, rel.as_posix())
    os.replace(tmp, out)
    return {'version': nibabel.__version__, 'bytes': out.stat().st_size}


def prepare(repo: str | Path = REPO, run_dir: str = RUN_DIR, label_maps: str = LABEL_MAPS,
            carry: str = CARRY, extra_anatomies: Sequence[str] = EXTRA_ANATOMIES,
            rebuild: bool = False, copy_run: str = 'auto') -> dict:
    """Write the carry folder; returns its manifest (also written as ``manifest.json``).

    ``copy_run``: 'auto' copies the run's checkpoint, config and logs into the carry folder
    when the travelling tree stays within the device limit with them (else they travel as
    files of the working tree), 'yes' always, 'no' never.
    """
    from .bundle import build_bundle, load_bundle

    repo = Path(repo)
    run = repo / run_dir
    cdir = repo / carry
    ignored = subprocess.run(['git', '-C', str(repo), 'check-ignore', '-q', f'{carry}/x'])
    if ignored.returncode != 0:
        raise ValueError(f'{carry}/ must be gitignored (it travels as a carried path)')
    cdir.mkdir(parents=True, exist_ok=True)
    ckpt = run / CHECKPOINT
    if not ckpt.is_file():
        raise FileNotFoundError(f'no checkpoint to continue: {ckpt}')
    bundle = cdir / BUNDLE_NAME
    maps_dir = (repo / label_maps) if not Path(label_maps).is_absolute() else Path(label_maps)
    if rebuild or not bundle.is_file():
        _log(f'bundling {maps_dir} + {", ".join(extra_anatomies) or "no extras"} -> {bundle}')
        build_bundle(maps_dir, bundle, extra_anatomies)
    b = load_bundle(bundle)
    missing = [e for e in extra_anatomies if e not in b.extras]
    if missing:
        raise ValueError(f'{bundle} lacks the extra anatomies {missing}: rebuild it (--rebuild)')
    nib = _slim_nibabel(cdir / NIBABEL_ZIP)

    # the run state as it is now (copied before reading so that the copy is one snapshot)
    snap = cdir / 'snapshot'
    shutil.rmtree(snap, ignore_errors=True)
    snap.mkdir()
    shutil.copy2(ckpt, snap / CHECKPOINT)  # first: logs copied after it are ahead, never behind
    for name in RUN_FILES:
        if (run / name).is_file():
            shutil.copy2(run / name, snap / name)
    import torch

    state = torch.load(snap / CHECKPOINT, map_location='cpu', weights_only=True)
    step = int(state['step'])
    held_out = list(state.get('held_out', []))
    bundle_train = [m.name for m in b.maps if m.name not in held_out] + [
        b.extras[e].name for e in extra_anatomies]
    if state.get('train_maps') and list(state['train_maps']) != bundle_train:
        raise ValueError(f"the bundle's training maps {bundle_train} are not the run's "
                         f"{list(state['train_maps'])}")
    manifest = {
        'created': time.strftime('%Y-%m-%dT%H:%M:%S'), 'run_dir': run_dir,
        'checkpoint': {'step': step, 'sha256': sha256_file(snap / CHECKPOINT),
                       'bytes': (snap / CHECKPOINT).stat().st_size},
        'bundle': {'file': BUNDLE_NAME, 'bytes': bundle.stat().st_size, 'sha256': sha256_file(bundle),
                   'maps': [m.name for m in b.maps],
                   'extras': {k: m.name for k, m in b.extras.items()},
                   'held_out': held_out},
        'nibabel': {'file': NIBABEL_ZIP, **nib},
        'recipe_args': list(RECIPE_ARGS),
    }
    sizes = travel_bytes(repo, [carry])  # snapshot included: drop it below if it does not fit
    snap_bytes = _size(snap)
    fits = sizes['total'] <= DEVICE_LIMIT_BYTES
    if copy_run == 'yes' or (copy_run == 'auto' and fits):
        os.replace(snap, cdir / 'run')
        manifest['run_state'] = f'{carry}/run (copied at step {step})'
    else:
        shutil.rmtree(snap)
        shutil.rmtree(cdir / 'run', ignore_errors=True)
        manifest['run_state'] = (f'{run_dir} (travels as working-tree files; a copy in the carry '
                                 f'folder, {snap_bytes} bytes, would not fit)')
    sizes = travel_bytes(repo, [carry])
    manifest['travel_bytes'] = sizes
    (cdir / 'manifest.json').write_text(json.dumps(manifest, indent=1) + '\n')
    if sizes['total'] > DEVICE_LIMIT_BYTES:
        raise ValueError(f"the travelling tree would be {sizes['total']} bytes, over the "
                         f"device's {DEVICE_LIMIT_BYTES}: {sizes}")
    _log(f"carry folder {cdir}: bundle {manifest['bundle']['bytes']} bytes "
         f"({len(b.maps)} maps + {', '.join(b.extras)}), nibabel {nib['version']} "
         f"{nib['bytes']} bytes; run state: {manifest['run_state']}; checkpoint step {step}")
    _log(f"travelling tree: {sizes['total']} of {DEVICE_LIMIT_BYTES} bytes "
         f"(tracked {sizes['tracked']}, untracked {sizes['untracked']}, carry {sizes['carry']})")
    return manifest


# ---------------------------------------------------------------------------- device (GPU machine)
#: What the device's python finds (printed before training).
_PROBE = """
try:
    import nibabel
    print('nibabel', nibabel.__version__, nibabel.__file__)
except ImportError as exc:
    print('no nibabel:', exc)
import torch
cuda = torch.cuda.is_available()
print('torch', torch.__version__, 'cuda', cuda, torch.cuda.get_device_name(0) if cuda else '')
"""


def _run_source(repo: Path, carry: str, run_dir: str) -> Path:
    carried = repo / carry / 'run'
    return carried if (carried / CHECKPOINT).is_file() else repo / run_dir


def device_run(out: str | Path, repo: str | Path = REPO, carry: str = CARRY,
               run_dir: str = RUN_DIR, device: str = 'cuda', max_minutes: float = 8.0,
               time_limit_s: float = 540.0, scratch: str | Path = '/tmp/keyprep-gpu-run',
               extra_args: Sequence[str] = (), python: str | None = None) -> int:
    """Resume the run on this machine and put the results under ``out``; returns the
    trainer's exit code (the results are packaged whatever it is)."""
    repo, out, scratch = Path(repo), Path(out), Path(scratch)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    cdir = repo / carry
    bundle = cdir / BUNDLE_NAME
    if not bundle.is_file():
        raise FileNotFoundError(f'{bundle} is missing: run `scripts/gpu_train.sh prepare` and '
                                f'name {carry} in the run call\'s carry list')
    mpath = cdir / 'manifest.json'
    manifest = json.loads(mpath.read_text()) if mpath.is_file() else {}
    # nibabel for validation (a pure-Python copy; the machine has none)
    site = scratch.with_name(scratch.name + '-site')
    if (cdir / NIBABEL_ZIP).is_file():
        shutil.rmtree(site, ignore_errors=True)
        with zipfile.ZipFile(cdir / NIBABEL_ZIP) as z:
            z.extractall(site)
    # the run, copied to a scratch folder (the trainer rewrites its logs)
    src = _run_source(repo, carry, run_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    shutil.copy2(src / CHECKPOINT, scratch / CHECKPOINT)
    for path in [*(src / n for n in RUN_FILES), *sorted(src.glob('val_step*.json'))]:
        if path.is_file():
            shutil.copy2(path, scratch / path.name)
    start_sha = sha256_file(scratch / CHECKPOINT)
    want = manifest.get('checkpoint', {}).get('sha256')
    if want and want != start_sha:
        _log(f"note: the checkpoint differs from the one `prepare` saw (step "
             f"{manifest['checkpoint']['step']}): the CPU run went on; continuing from this one")
    env = dict(os.environ)
    paths = [str(repo)] + ([str(site)] if site.is_dir() else []) + (
        [env['PYTHONPATH']] if env.get('PYTHONPATH') else [])
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED='1', NIPYPE_NO_ET='1',
               NO_ET='1')
    py = python or sys.executable
    probe = subprocess.run([py, '-c', _PROBE], env=env, capture_output=True, text=True)
    _log((probe.stdout + probe.stderr).strip().replace('\n', '; '))
    cmd = [py, '-m', 'keyprep.bids_app.train', 'synthseg', '--label-maps', str(bundle),
           '--output', str(scratch), *RECIPE_ARGS, '--device', device,
           '--max-minutes', f'{max_minutes:g}', *extra_args]
    _log('running: ' + ' '.join(cmd))
    log_path = out / 'device.log'
    with open(log_path, 'w') as log:
        log.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n# {probe.stdout}")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        deadline = t0 + time_limit_s
        stopped = False
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.time()
            if left <= 0 and not stopped:  # hard limit: stop (the last periodic checkpoint counts)
                _log(f'time limit {time_limit_s:.0f} s reached: interrupting the trainer')
                proc.send_signal(signal.SIGINT)
                stopped = True
                deadline = time.time() + 20
                continue
            if left <= 0 and stopped:
                proc.kill()
                break
            if sel.select(timeout=min(max(left, 0.1), 5.0)):
                line = proc.stdout.readline()
                if not line:
                    break
                sys.stdout.write(line)
                log.write(line)
                log.flush()
        sel.close()
        rc = proc.wait()
    _log(f'trainer exit code {rc} after {time.time() - t0:.0f} s')
    start_step = manifest.get('checkpoint', {}).get('step')
    package(scratch, out, meta={'start_sha256': start_sha, 'prepare_step': start_step,
                                'trainer_rc': rc, 'device': device,
                                'wall_s': round(time.time() - t0, 1)})
    return rc


def package(run: str | Path, out: str | Path, meta: dict | None = None) -> list[Path]:
    """Put a run's results under ``out`` (at most :data:`MAX_OUT_FILES` files, each under
    16 MiB): the checkpoint in parts with its manifest, the two logs, and the rest
    (``validated.pt``, ``train_config.json``, ``val_step*.json``) in ``run_files.tar``."""
    run, out = Path(run), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = run / CHECKPOINT
    step = checkpoint_step(ckpt)
    _truncate_logs(run, step)
    split_file(ckpt, out, meta={'step': step, **(meta or {})})
    for name in ('train_log.tsv', 'val_log.tsv'):
        if (run / name).is_file():
            shutil.copy2(run / name, out / name)
    with tarfile.open(out / 'run_files.tar', 'w') as tar:
        extras = [run / 'validated.pt', run / 'train_config.json',
                  *sorted(run.glob('val_step*.json'))]
        for path in extras:
            if path.is_file():
                tar.add(path, arcname=path.name)
    files = sorted(p for p in out.iterdir() if p.is_file())
    big = [p.name for p in files if p.stat().st_size >= 16 * 2**20]
    if len(files) > MAX_OUT_FILES or big:
        raise ValueError(f'{out}: {len(files)} files (at most {MAX_OUT_FILES}), too large: {big}')
    _log(f'packaged step {step}: ' + ', '.join(f'{p.name} ({p.stat().st_size})' for p in files))
    return files


def _truncate_logs(run: Path, step: int) -> None:
    """Drop log rows written after the checkpoint's step (as the trainer does on resuming)."""
    for name in ('train_log.tsv', 'val_log.tsv'):
        path = run / name
        if path.is_file():
            rows = path.read_text().splitlines()
            kept = rows[:1] + [r for r in rows[1:] if r and int(r.split('\t')[0]) <= step]
            path.write_text('\n'.join(kept) + '\n')


# ---------------------------------------------------------------------------- collect (here)
def collect(files_at: str | Path, run_dir: str | Path = REPO / RUN_DIR,
            backup_root: str | Path | None = REPO / BACKUP, check_running: bool = True) -> dict:
    """Install the device run's results into ``run_dir`` (see the module docstring)."""
    files_at, run_dir = Path(files_at), Path(run_dir)
    if check_running:
        pids = trainer_processes(run_dir)
        if pids:
            raise RuntimeError(f'a `keyprep train synthseg` for {run_dir} is running (pid '
                               f'{", ".join(map(str, pids))}): stop it before collecting')
    manifests = sorted(files_at.rglob(f'{CHECKPOINT}.parts.json'))
    if len(manifests) != 1:
        raise FileNotFoundError(f'expected one {CHECKPOINT}.parts.json under {files_at}, found '
                                f'{len(manifests)}')
    got = manifests[0].parent
    info = json.loads(manifests[0].read_text())
    import tempfile

    with tempfile.TemporaryDirectory(prefix='keyprep-collect-') as tmpd:
        tmp = Path(tmpd)
        new_ckpt = join_parts(manifests[0], tmp / CHECKPOINT)
        new_step = checkpoint_step(new_ckpt)
        if new_step != info.get('step', new_step):
            raise ValueError(f"the checkpoint's step {new_step} is not the manifest's "
                             f"{info['step']}")
        old = run_dir / CHECKPOINT
        old_step = checkpoint_step(old) if old.is_file() else -1
        if new_step <= old_step:
            raise ValueError(f'the device checkpoint (step {new_step}) is not past the installed '
                             f'one (step {old_step}): nothing to collect')
        for name in ('train_log.tsv', 'val_log.tsv'):
            if (got / name).is_file():
                shutil.copy2(got / name, tmp / name)
        if (got / 'run_files.tar').is_file():
            with tarfile.open(got / 'run_files.tar') as tar:
                for member in tar.getmembers():
                    if member.isfile() and '/' not in member.name:
                        (tmp / member.name).write_bytes(tar.extractfile(member).read())
        _truncate_logs(tmp, new_step)
        incoming = sorted(p for p in tmp.iterdir() if p.is_file())
        backup = None
        if backup_root is not None:
            backup = Path(backup_root) / f"backup-{time.strftime('%Y%m%d-%H%M%S')}"
            backup.mkdir(parents=True, exist_ok=True)
            for p in incoming:
                if (run_dir / p.name).is_file():
                    shutil.copy2(run_dir / p.name, backup / p.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        # the checkpoint last: a collect interrupted half-way leaves the old checkpoint, and
        # the trainer trims logs that run ahead of it
        for p in [p for p in incoming if p.name != CHECKPOINT] + [tmp / CHECKPOINT]:
            shutil.copy2(p, run_dir / (p.name + '.tmp'))
            os.replace(run_dir / (p.name + '.tmp'), run_dir / p.name)
    result = {'installed_step': new_step, 'previous_step': old_step, 'run_dir': str(run_dir),
              'files': [p.name for p in incoming], 'backup': str(backup) if backup else None,
              'device_meta': {k: v for k, v in info.items() if k not in ('parts', 'name')}}
    _log(f'installed step {new_step} (was {old_step}) into {run_dir}: '
         f"{', '.join(result['files'])}; previous files in {backup}")
    return result


# ---------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog='python -m keyprep.pipeline.synth.handoff',
                                 description=__doc__.split('\n\n')[0])
    sub = ap.add_subparsers(dest='verb', required=True)
    p = sub.add_parser('prepare', help='write the carry folder (here)')
    p.add_argument('--repo', default=str(REPO))
    p.add_argument('--run-dir', default=RUN_DIR)
    p.add_argument('--label-maps', default=LABEL_MAPS)
    p.add_argument('--carry', default=CARRY)
    p.add_argument('--rebuild', action='store_true', help='rebuild the label-map bundle')
    p.add_argument('--copy-run', choices=['auto', 'yes', 'no'], default='auto')
    d = sub.add_parser('device', help='resume the run on this (GPU) machine, results to OUT')
    d.add_argument('--out', default=os.environ.get('OUT'), help='results folder (default: $OUT)')
    d.add_argument('--repo', default=str(REPO))
    d.add_argument('--carry', default=CARRY)
    d.add_argument('--run-dir', default=RUN_DIR)
    d.add_argument('--device', default='cuda')
    d.add_argument('--max-minutes', type=float, default=8.0)
    d.add_argument('--time-limit', type=float, default=540.0,
                   help='seconds after which the trainer is interrupted (the device allows 600)')
    d.add_argument('--scratch', default='/tmp/keyprep-gpu-run')
    d.add_argument('train_args', nargs='*', help='more trainer options (after --)')
    c = sub.add_parser('collect', help='install the results (here, CPU run stopped)')
    c.add_argument('files_at', help="the run call's files_at folder")
    c.add_argument('--run-dir', default=str(REPO / RUN_DIR))
    c.add_argument('--backup-root', default=str(REPO / BACKUP))
    args = ap.parse_args(argv)
    try:
        if args.verb == 'prepare':
            prepare(args.repo, args.run_dir, args.label_maps, args.carry, rebuild=args.rebuild,
                    copy_run=args.copy_run)
            return 0
        if args.verb == 'device':
            if not args.out:
                ap.error('--out or $OUT is needed')
            rc = device_run(args.out, args.repo, args.carry, args.run_dir, args.device,
                            args.max_minutes, args.time_limit, args.scratch, args.train_args)
            return 0 if rc in (0, -signal.SIGINT, 130) else rc
        collect(args.files_at, args.run_dir, args.backup_root)
        return 0
    except (OSError, ValueError, RuntimeError) as exc:
        _log(f'error: {exc}')
        return 1


if __name__ == '__main__':
    raise SystemExit(main())

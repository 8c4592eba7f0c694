"""``keyprep-slurm``: keyprep on a SLURM cluster, one participant per array task.

``keyprep-slurm [SLURM options] bids_dir output_dir [participant] [keyprep options]``
writes, into ``<output_dir>/slurm/`` (``--slurm-dir``):

* ``participants.txt``: the participants to process, one label per line, read from the
  dataset with keyprep's own queries (``--participant-label``, ``--session-label`` and
  ``--bids-filter-file`` are honoured); line *N* is array task *N*;
* ``keyprep_participant.sbatch``: the array job. Task *N* runs keyprep on participant *N*
  with its own work folder ``<work-root>/sub-<label>`` (kept across resubmissions, so a
  task that was killed or timed out resumes where it stopped), writes its log to
  ``logs/<job-name>_<array job>_<task>.out`` and its exit code to
  ``exitcodes/<array job>_<task>.tsv``;
* ``keyprep_group.sbatch``: the group level, submitted with ``--dependency=afterok`` on the
  array so that it runs once every participant succeeded;
* ``submit.sh``: the two ``sbatch`` calls.

``--submit`` also submits them. With ``--container IMAGE.sif`` every task runs
``apptainer run --cleanenv [--nv] -B ...`` on the image instead of the ``keyprep`` of this
installation. With ``--nipype-plugin SLURM`` one driver job runs the participant level
with Nipype's SLURM plugin instead (every node a job of its own); see ``docs/hpc.md``.
Every option that keyprep-slurm does not know is passed on to keyprep.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..pipeline.errors import EXIT_OK, EXIT_USAGE, KeyprepError, UsageError

__all__ = ['SlurmJobs', 'build_parser', 'main', 'select_participants', 'submit',
           'write_slurm_scripts']

PARTICIPANT_SCRIPT = 'keyprep_participant.sbatch'
GROUP_SCRIPT = 'keyprep_group.sbatch'
DRIVER_SCRIPT = 'keyprep_nipype_driver.sbatch'
PLUGIN_FILE = 'nipype_plugin.yml'

#: keyprep options whose value is a path: made absolute, since the jobs run elsewhere.
_PATH_OPTIONS = ('--bids-filter-file', '--use-plugin', '--nipype-plugin-file', '--target',
                 '--keymorph-weights')
#: keyprep options that keyprep-slurm sets per task.
_OWN_OPTIONS = ('--participant-label', '--participant_label', '-w', '--work-dir')


@dataclass
class SlurmJobs:
    """What :func:`write_slurm_scripts` wrote."""

    slurm_dir: Path
    participants: list[str]
    participant_script: Path | None = None
    group_script: Path | None = None
    driver_script: Path | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    job_ids: dict[str, str] = field(default_factory=dict)

    @property
    def main_script(self) -> Path:
        """The job the group level waits for (the array, or the Nipype driver)."""
        return self.driver_script or self.participant_script


def build_parser() -> argparse.ArgumentParser:
    """The options of ``keyprep-slurm`` (all others are keyprep's)."""
    parser = argparse.ArgumentParser(
        prog='keyprep-slurm', allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Write (and with --submit, submit) a SLURM array job that runs keyprep on '
                    'one participant per task, each with its own work folder, and a group '
                    'job that runs when all tasks succeeded (afterok). Options not listed here '
                    'are passed on to keyprep (see keyprep --help), e.g. --participant-label, '
                    '--session-label, --bids-filter-file, --methods, --target, --sloppy.',
        epilog='example:\n  keyprep-slurm /data/bids /data/derivatives/keyprep --partition short '
               '--time 2:00:00 --mem 8G --cpus-per-task 4 \\\n      --work-root '
               "'/scratch/$USER/keyprep-work' --container keyprep-0.1.0.sif --submit "
               '--methods antsSyN\n\nexit codes: 0 success, 1 sbatch failed, 18 no '
               'participant selected, 64 usage error, 66 no input\n')
    parser.add_argument('bids_dir', type=Path, help='the root folder of a BIDS dataset')
    parser.add_argument('output_dir', type=Path, help='the output folder (derivatives)')
    g = parser.add_argument_group('Jobs')
    g.add_argument('--slurm-dir', type=Path, metavar='DIR',
                   help='where the scripts, participant list, logs and exit codes go '
                        '(default: <output_dir>/slurm)')
    g.add_argument('--work-root', metavar='DIR',
                   help='parent of the per-participant work folders <work-root>/sub-<label>; '
                        'may name variables that are expanded on the compute node, e.g. '
                        "'/scratch/$USER/keyprep' (quote it); keep it on a file system that "
                        'outlives the job to resume after a timeout (default: '
                        '<slurm-dir>/work)')
    g.add_argument('--job-name', default='keyprep', help='job name (default: keyprep)')
    g.add_argument('--submit', action='store_true',
                   help='submit the jobs with sbatch (default: only write them)')
    g.add_argument('--array', metavar='IDS',
                   help='with --submit: only these array tasks, e.g. 2,5-7 (a resubmission: '
                        'the tasks resume from their work folders)')
    g.add_argument('--max-parallel', type=int, metavar='N',
                   help='at most N array tasks at once (sbatch --array=...%%N)')
    g.add_argument('--no-group', action='store_true', help='no group-level job')
    g = parser.add_argument_group('Resources (per participant task)')
    g.add_argument('--partition', metavar='NAME', help='SLURM partition')
    g.add_argument('--time', default='02:00:00', metavar='T',
                   help='time limit per task (default: 02:00:00)')
    g.add_argument('--mem', default='8G', metavar='MEM',
                   help='memory per task, SLURM syntax (default: 8G); also keyprep\'s memory '
                        'budget unless keyprep --mem-mb is given')
    g.add_argument('--cpus-per-task', type=int, default=4, metavar='N',
                   help='CPUs per task (default: 4); also keyprep --nprocs unless given')
    g.add_argument('--gpus', type=int, default=0, metavar='N',
                   help='GPUs per task (default: 0); with N > 0 keyprep gets --device cuda '
                        'unless --device is given, and apptainer --nv')
    g.add_argument('--sbatch-arg', action='append', default=[], metavar='ARG',
                   help='extra #SBATCH line for every job, e.g. --sbatch-arg=--account=lab '
                        '(repeatable)')
    g = parser.add_argument_group('Software')
    g.add_argument('--container', type=Path, metavar='IMAGE',
                   help='Apptainer/Singularity image: tasks run apptainer run --cleanenv '
                        '[--nv] with the dataset bound read-only')
    g.add_argument('--container-cmd', default='apptainer', metavar='CMD',
                   help='apptainer or singularity (default: apptainer)')
    g.add_argument('--bind', action='append', default=[], metavar='SPEC',
                   help='extra apptainer bind, SRC[:DST[:ro]] (repeatable)')
    g.add_argument('--keyprep', metavar='CMD',
                   help='the keyprep command on the compute nodes without --container '
                        '(default: the keyprep of this installation)')
    # SLURMGraph is not offered: it returns once the jobs are submitted, before they ran, so
    # keyprep's reports and the afterok group job would come too early.
    g.add_argument('--nipype-plugin', choices=('SLURM',),
                   help="instead of the array: one driver job runs the participant level with "
                        "Nipype's plugin, which submits every node as a job of its own "
                        '(needs keyprep installed on the cluster, not a container)')
    parser.add_argument('--version', action='version', version=f'keyprep-slurm v{__version__}')
    return parser


def _split_keyprep_args(rest: list[str]) -> tuple[list[str] | None, list[str]]:
    """Take ``--participant-label`` out of keyprep's arguments; refuse ``-w``."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument('--participant-label', '--participant_label', nargs='+')
    own.add_argument('-w', '--work-dir')
    ns, others = own.parse_known_args(rest)
    if ns.work_dir is not None:
        raise UsageError('keyprep-slurm gives every task its own work folder: use --work-root '
                         'instead of -w/--work-dir')
    return ns.participant_label, others


def _absolute_paths(args: list[str]) -> list[str]:
    """Make the values of path options absolute (the jobs may start in another folder)."""
    out = list(args)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition('=')
        if name not in _PATH_OPTIONS:
            continue
        if eq:
            if Path(value).exists():
                out[i] = f'{name}={Path(value).absolute()}'
        elif i + 1 < len(out) and Path(out[i + 1]).exists():
            out[i + 1] = str(Path(out[i + 1]).absolute())
    return out


def _groupwise_target(args: list[str]) -> bool:
    """Whether keyprep's arguments ask for ``--target groupwise[:res-N]``."""
    for i, a in enumerate(args):
        value = a.split('=', 1)[1] if a.startswith('--target=') else (
            args[i + 1] if a == '--target' and i + 1 < len(args) else None)
        if value is not None and value.strip().split(':')[0] == 'groupwise':
            return True
    return False


def _has_option(args: list[str], *names: str) -> bool:
    return any(a in names or a.split('=', 1)[0] in names for a in args)


def select_participants(bids_dir: Path, keyprep_argv: list[str]) -> tuple[list[str], dict]:
    """The participants keyprep would process with these arguments, and those left out.

    The selection is keyprep's own: :func:`keyprep.bids_app.bids.collect_participants`
    (``--participant-label``), then :func:`collect_groups` on a temporary pybids index
    (``--session-label``, ``--bids-filter-file``); a participant without any selected
    anatomical image is left out, with the reason.
    """
    from .bids import collect_groups, collect_participants, init_layout
    from .parser import parse_args

    opts = parse_args(keyprep_argv)
    subjects = collect_participants(bids_dir, opts.participant_label)
    with tempfile.TemporaryDirectory(prefix='keyprep-slurm-db-') as db:
        layout = init_layout(bids_dir, Path(db), subjects)
        groups = collect_groups(layout, subjects, opts.session_label, opts.bids_filters)
    selected = sorted({g.subject for g in groups if g.images})
    skipped = {g.subject: '; '.join(msg for msg, _ in g.errors)
               for g in groups if not g.images and g.subject not in selected}
    return selected, skipped


def _dq(text: str) -> str:
    """Double-quote for bash, leaving ``$VAR`` to be expanded when the job runs."""
    return '"' + re.sub(r'(["\\`])', r'\\\1', text) + '"'


def _sbatch_header(*, job_name: str, output: Path, partition: str | None, time_limit: str,
                   mem: str, cpus: int, gpus: int, extra: list[str],
                   array: str | None = None) -> list[str]:
    lines = ['#!/bin/bash', f'#SBATCH --job-name={job_name}']
    if array:
        lines.append(f'#SBATCH --array={array}')
    lines += [f'#SBATCH --cpus-per-task={cpus}', f'#SBATCH --mem={mem}',
              f'#SBATCH --time={time_limit}', f'#SBATCH --output={output}']
    if partition:
        lines.append(f'#SBATCH --partition={partition}')
    if gpus:
        lines.append(f'#SBATCH --gpus={gpus}')
    lines += [f'#SBATCH {arg}' for arg in extra]
    return lines


def _keyprep_command(args, binds: list[str], gpus: int) -> list[str]:
    """The command that starts keyprep on a compute node (bash words, already quoted)."""
    if args.container is None:
        exe = args.keyprep
        if exe is None:
            local = Path(sys.executable).parent / 'keyprep'
            exe = str(local) if local.exists() else (shutil.which('keyprep') or 'keyprep')
        return [shlex.quote(exe)]
    words = [shlex.quote(args.container_cmd), 'run', '--cleanenv']
    if gpus:
        words.append('--nv')
    for spec in binds:
        words += ['-B', _dq(spec) if '$' in spec else shlex.quote(spec)]
    words.append(shlex.quote(str(args.container.absolute())))
    return words


_RUN_AND_RECORD = r'''
# keyprep runs in the background so that a SIGTERM (scancel, time limit) reaches it and the
# exit code is still recorded; rerunning with the same work folder resumes.
START=$(date +%s)
set +e
{command} &
PID=$!
trap 'kill -TERM $PID 2>/dev/null' TERM INT
wait $PID
CODE=$?
while kill -0 $PID 2>/dev/null; do wait $PID; CODE=$?; done
set -e
mkdir -p "$SLURM_DIR/exitcodes"
TMP=$(mktemp "$SLURM_DIR/exitcodes/.{record}.XXXXXX")
printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' {fields} "$CODE" "$(hostname)" "$START" "$(date +%s)" > "$TMP"
mv -f "$TMP" "$SLURM_DIR/exitcodes/{record}.tsv"
echo "keyprep-slurm: exit code $CODE ($(( $(date +%s) - START )) s)"
exit $CODE
'''

_EXITCODE_HEADER = 'participant\tarray_task\tjob\texit_code\thost\tstart\tend'


def write_slurm_scripts(argv: list[str] | None = None) -> SlurmJobs:
    """Parse ``keyprep-slurm`` arguments and write the job scripts (nothing is submitted).

    Raises :class:`KeyprepError` (with keyprep's exit codes) for bad arguments or when no
    participant is selected.
    """
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and rest[0] in ('participant', 'group'):
        if rest[0] == 'group':
            raise UsageError('keyprep-slurm submits the participant level and then the group '
                             'level; run `keyprep bids_dir output_dir group` directly for the '
                             'group level alone')
        rest = rest[1:]
    bids_dir = args.bids_dir.expanduser().absolute()
    out_dir = args.output_dir.expanduser().absolute()
    labels, passthrough = _split_keyprep_args(rest)
    passthrough = _absolute_paths(passthrough)
    if args.max_parallel is not None and args.max_parallel < 1:
        raise UsageError('--max-parallel must be 1 or more')
    if args.cpus_per_task < 1 or args.gpus < 0:
        raise UsageError('--cpus-per-task must be 1 or more and --gpus 0 or more')
    if _has_option(passthrough, '--bids-database-dir'):
        raise UsageError('--bids-database-dir cannot be shared by parallel tasks: each task '
                         'indexes the dataset into its own work folder')
    if args.nipype_plugin and args.container is not None:
        raise UsageError("--nipype-plugin runs every node as a job of its own with the host's "
                         'Python: it needs keyprep installed on the cluster (scripts/'
                         'install_keyprep.sh), not --container; use the array job with '
                         'containers')
    if args.container is not None and not args.container.exists():
        raise UsageError(f'--container image not found: {args.container}')
    if not args.nipype_plugin and _groupwise_target(passthrough):
        raise UsageError('--target groupwise builds one template from all participants: the '
                         'array job runs each participant alone; use --nipype-plugin SLURM '
                         '(one driver for the whole run)')

    # keyprep's own checks and selection (exit codes 64, 16, 18, 66 as keyprep would give)
    check_argv = [str(bids_dir), str(out_dir), 'participant', *passthrough]
    if labels:
        check_argv += ['--participant-label', *labels]
    _reject_abbreviations(passthrough, bids_dir, out_dir)
    participants, skipped = select_participants(bids_dir, check_argv)

    slurm_dir = (args.slurm_dir or out_dir / 'slurm').expanduser().absolute()
    logs = slurm_dir / 'logs'
    for d in (out_dir, slurm_dir, logs, slurm_dir / 'exitcodes'):
        d.mkdir(parents=True, exist_ok=True)
    work_root = args.work_root or str(slurm_dir / 'work')
    if not work_root.startswith(('/', '$', '~')):
        work_root = str(Path(work_root).absolute())
    (slurm_dir / 'participants.txt').write_text(''.join(f'{p}\n' for p in participants))
    if skipped:
        (slurm_dir / 'participants_skipped.tsv').write_text(
            'participant\treason\n' + ''.join(f'sub-{s}\t{r}\n' for s, r in skipped.items()))
    elif (slurm_dir / 'participants_skipped.tsv').exists():
        (slurm_dir / 'participants_skipped.tsv').unlink()

    extra = list(passthrough)
    if not _has_option(extra, '--nprocs', '--nthreads', '--n_cpus', '--n-cpus'):
        extra += ['--nprocs', str(args.cpus_per_task)]
    if not _has_option(extra, '--mem', '--mem-mb', '--mem_mb'):
        extra += ['--mem', args.mem]
    if args.gpus and not _has_option(extra, '--device'):
        extra += ['--device', 'cuda']
    extra_words = ' '.join(shlex.quote(a) for a in extra)
    stamp = time.strftime('%Y-%m-%d %H:%M:%S')
    jobs = SlurmJobs(slurm_dir=slurm_dir, participants=participants, skipped=skipped)
    common = {'partition': args.partition, 'extra': args.sbatch_arg}

    binds = [f'{bids_dir}:{bids_dir}:ro', str(out_dir), '$WORK', *args.bind]
    if args.nipype_plugin:
        jobs.driver_script = _write_driver(args, slurm_dir, bids_dir, out_dir, work_root,
                                           participants, extra_words, stamp, common)
    else:
        n = len(participants)
        array = f'1-{n}' + (f'%{args.max_parallel}' if args.max_parallel else '')
        header = _sbatch_header(job_name=args.job_name, output=logs / '%x_%A_%a.out',
                                time_limit=args.time, mem=args.mem, cpus=args.cpus_per_task,
                                gpus=args.gpus, array=array, **common)
        command = ' '.join(_keyprep_command(args, binds, args.gpus) + [
            shlex.quote(str(bids_dir)), shlex.quote(str(out_dir)), 'participant',
            '--participant-label', '"$LABEL"', '-w', '"$WORK"', extra_words]).rstrip()
        body = [
            (f'# Written by keyprep-slurm {__version__} on {stamp}: one participant per array '
             'task.'),
            f'# Submit: sbatch {shlex.quote(str(slurm_dir / PARTICIPANT_SCRIPT))}',
            ('# Resubmit some tasks (they resume from their work folders): sbatch --array=2,5 '
             'this file'),
            'set -eu',
            f'SLURM_DIR={shlex.quote(str(slurm_dir))}',
            'TASK=${SLURM_ARRAY_TASK_ID:?submit this script with sbatch (an array job)}',
            'LABEL=$(sed -n "${TASK}p" "$SLURM_DIR/participants.txt")',
            ('if [ -z "$LABEL" ]; then echo "keyprep-slurm: no participant for task $TASK" >&2;'
             ' exit 64; fi'),
            f'WORK_ROOT={_dq(work_root)}',
            'WORK="$WORK_ROOT/sub-$LABEL"',
            'mkdir -p "$WORK"',
            ('echo "keyprep-slurm: sub-$LABEL, job ${SLURM_ARRAY_JOB_ID}_${TASK} on $(hostname),'
             ' work folder $WORK"'),
        ]
        script = '\n'.join(header + [''] + body) + _RUN_AND_RECORD.format(
            command=command, record='${SLURM_ARRAY_JOB_ID}_${TASK}',
            fields='"sub-$LABEL" "$TASK" "${SLURM_ARRAY_JOB_ID}_${TASK}"')
        jobs.participant_script = _write_script(slurm_dir / PARTICIPANT_SCRIPT, script)

    if not args.no_group:
        header = _sbatch_header(job_name=f'{args.job_name}-group', output=logs / '%x_%j.out',
                                time_limit='01:00:00', mem='4G', cpus=1, gpus=0, **common)
        group_binds = [f'{bids_dir}:{bids_dir}:ro', str(out_dir), *args.bind]
        command = ' '.join(_keyprep_command(args, group_binds, 0) + [
            shlex.quote(str(bids_dir)), shlex.quote(str(out_dir)), 'group'])
        body = [
            (f'# Written by keyprep-slurm {__version__} on {stamp}: the group level, after '
             'every participant task succeeded.'),
            'set -eu',
            f'SLURM_DIR={shlex.quote(str(slurm_dir))}',
            f"echo 'exit codes of the participant tasks ({_EXITCODE_HEADER}):'",
            'cat "$SLURM_DIR"/exitcodes/*.tsv 2>/dev/null || true',
            f'exec {command}',
        ]
        jobs.group_script = _write_script(slurm_dir / GROUP_SCRIPT,
                                          '\n'.join(header + [''] + body) + '\n')

    submit_lines = ['#!/bin/bash', '# Submit the jobs keyprep-slurm wrote (what --submit does).',
                    'set -eu', f'cd {shlex.quote(str(slurm_dir))}',
                    f'JOB=$(sbatch --parsable {jobs.main_script.name} | cut -d";" -f1)',
                    'echo "participant job: $JOB"']
    if jobs.group_script:
        submit_lines += [(f'GROUP=$(sbatch --parsable --dependency=afterok:$JOB '
                          f'--kill-on-invalid-dep=yes {GROUP_SCRIPT} | cut -d";" -f1)'),
                         'echo "group job: $GROUP (runs after $JOB succeeded)"']
    _write_script(slurm_dir / 'submit.sh', '\n'.join(submit_lines) + '\n')
    return jobs


def _reject_abbreviations(passthrough: list[str], bids_dir: Path, out_dir: Path) -> None:
    """An abbreviated ``--participant-label`` or ``--work-dir`` would reach every task."""
    from .parser import build_parser as keyprep_parser

    try:
        opts, _ = keyprep_parser().parse_known_args(
            [str(bids_dir), str(out_dir), 'participant', *passthrough])
    except SystemExit as exc:
        raise KeyprepError('invalid keyprep options (see the message above)',
                           int(exc.code or EXIT_USAGE)) from None
    if opts.participant_label:
        raise UsageError('spell --participant-label in full (keyprep-slurm gives each task '
                         'one participant)')
    if opts.work_dir != Path('work'):
        raise UsageError('keyprep-slurm gives every task its own work folder: use --work-root '
                         'instead of -w/--work-dir')


def _write_driver(args, slurm_dir: Path, bids_dir: Path, out_dir: Path, work_root: str,
                  participants: list[str], extra_words: str, stamp: str, common: dict) -> Path:
    """The Nipype-plugin variant: one driver job; Nipype submits every node."""
    import yaml

    sbatch_args = [f'--cpus-per-task={args.cpus_per_task}', f'--mem={args.mem}',
                   f'--time={args.time}']
    if args.partition:
        sbatch_args.append(f'--partition={args.partition}')
    if args.gpus:
        sbatch_args.append(f'--gpus={args.gpus}')
    sbatch_args += args.sbatch_arg
    plugin_args = {'sbatch_args': ' '.join(sbatch_args)}
    if args.max_parallel:
        plugin_args['max_jobs'] = args.max_parallel
    plugin_file = slurm_dir / PLUGIN_FILE
    plugin_file.write_text(
        f'# Written by keyprep-slurm {__version__}: keyprep --use-plugin {plugin_file}\n'
        + yaml.safe_dump({'plugin': args.nipype_plugin, 'plugin_args': plugin_args},
                         sort_keys=False))
    header = _sbatch_header(job_name=args.job_name, output=slurm_dir / 'logs' / '%x_%j.out',
                            time_limit=args.time, mem='4G', cpus=1, gpus=0, **common)
    command = ' '.join(_keyprep_command(args, [], 0) + [
        shlex.quote(str(bids_dir)), shlex.quote(str(out_dir)), 'participant',
        '--participant-label', *participants, '-w', '"$WORK"', '--use-plugin',
        shlex.quote(str(plugin_file)), extra_words]).rstrip()
    body = [
        (f'# Written by keyprep-slurm {__version__} on {stamp}: the participant level with '
         f"Nipype's {args.nipype_plugin} plugin (every node a job; this job only drives them)."),
        'set -eu',
        f'SLURM_DIR={shlex.quote(str(slurm_dir))}',
        f'WORK_ROOT={_dq(work_root)}',
        'WORK="$WORK_ROOT/nipype"  # shared by every node job: not node-local',
        'mkdir -p "$WORK"',
        'export LOGNAME="${LOGNAME:-$(id -un)}"  # Nipype names the node jobs after it',
    ]
    script = '\n'.join(header + [''] + body) + _RUN_AND_RECORD.format(
        command=command, record='${SLURM_JOB_ID}_driver',
        fields='"all" "-" "${SLURM_JOB_ID}"')
    return _write_script(slurm_dir / DRIVER_SCRIPT, script)


def _write_script(path: Path, text: str) -> Path:
    from ..pipeline.io import atomic_write_text

    atomic_write_text(path, text)
    path.chmod(0o755)
    return path


def submit(jobs: SlurmJobs, array: str | None = None, sbatch: str = 'sbatch') -> dict[str, str]:
    """Submit the participant job (only the ``array`` tasks when given), then the group job
    with ``--dependency=afterok:<job>``; return the job ids."""
    def run(cmd):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        except FileNotFoundError:
            raise KeyprepError(f'{sbatch} not found: is this a SLURM login node?', 1) from None
        except subprocess.CalledProcessError as exc:
            raise KeyprepError(f'{" ".join(cmd)} failed: {exc.stderr.strip()}', 1) from None
        return res.stdout.strip().split(';')[0]

    cmd = [sbatch, '--parsable']
    if array:
        if jobs.driver_script:
            raise UsageError('--array applies to the array job, not to --nipype-plugin')
        cmd.append(f'--array={array}')
    ids = {'participant': run(cmd + [str(jobs.main_script)])}
    if jobs.group_script:
        ids['group'] = run([sbatch, '--parsable', f'--dependency=afterok:{ids["participant"]}',
                            '--kill-on-invalid-dep=yes', str(jobs.group_script)])
    with open(jobs.slurm_dir / 'jobs.tsv', 'a') as fh:
        fh.write(f'{time.strftime("%Y-%m-%dT%H:%M:%S")}\t{ids["participant"]}\t'
                 f'{ids.get("group", "")}\t{array or "all"}\n')
    jobs.job_ids = ids
    return ids


def main(argv: list[str] | None = None) -> int:
    """Console script ``keyprep-slurm``."""
    from .run import _setup_logging

    os.environ.setdefault('NIPYPE_NO_ET', '1')
    _setup_logging(0)
    try:
        jobs = write_slurm_scripts(argv)
        args, _ = build_parser().parse_known_args(argv)
        n = len(jobs.participants)
        print(f'keyprep-slurm: {n} participant(s) in {jobs.slurm_dir / "participants.txt"}')
        for sub, why in jobs.skipped.items():
            print(f'keyprep-slurm: sub-{sub} left out: {why}')
        print(f'keyprep-slurm: wrote {jobs.main_script}'
              + (f' and {jobs.group_script}' if jobs.group_script else ''))
        if args.submit:
            ids = submit(jobs, args.array)
            print(f'keyprep-slurm: submitted job {ids["participant"]}'
                  + (f', group job {ids["group"]} (afterok)' if 'group' in ids else ''))
            print(f'keyprep-slurm: logs in {jobs.slurm_dir / "logs"}, exit codes in '
                  f'{jobs.slurm_dir / "exitcodes"}')
        else:
            print(f'keyprep-slurm: submit with  bash {jobs.slurm_dir / "submit.sh"}  (or rerun '
                  'with --submit)')
    except KeyprepError as exc:
        print(f'keyprep-slurm: error: {exc}', file=sys.stderr)
        code = exc.exit_code
    except SystemExit as exc:  # argparse, or keyprep's parser on bad keyprep options
        code = int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    else:
        code = EXIT_OK
    if argv is None:
        sys.exit(code)
    return code


if __name__ == '__main__':  # pragma: no cover
    main()

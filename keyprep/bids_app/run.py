"""``keyprep`` entry point: participant and group levels."""

from __future__ import annotations

import os

# Before nipype is imported anywhere: no network check, no oversubscribed BLAS.
os.environ.setdefault('NIPYPE_NO_ET', '1')
os.environ.setdefault('NO_ET', '1')

import errno  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

from .. import __version__  # noqa: E402
from ..pipeline.errors import (  # noqa: E402
    EXIT_DATA,
    EXIT_FAILED_NODES,
    EXIT_IOERR,
    EXIT_NO_INPUT,
    EXIT_NO_MATCH,
    EXIT_OK,
    EXIT_SIGINT,
    KeyprepError,
)

__all__ = ['main', 'prepare_folder', 'run']

LOGGER = logging.getLogger('keyprep')

#: When several problems happened, the exit code reports the first of these.
_EXIT_PRIORITY = (EXIT_FAILED_NODES, EXIT_DATA, EXIT_NO_INPUT, EXIT_NO_MATCH)

#: OSErrors that the environment causes (a full disk, a quota, a read-only file system, a
#: path taken by a file): exit 74 with one line instead of "internal error".
_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                 errno.EPERM, errno.EIO, errno.EFBIG, errno.ENOTDIR,
                                 errno.EEXIST})


#: True in the console script: after SIGINT/SIGTERM, the signal watcher also ends a
#: process whose exit hangs (see :class:`~keyprep.bids_app.guard.Interruptions`).
_CONSOLE = False


def main() -> None:
    """Console script."""
    global _CONSOLE
    _CONSOLE = True
    sys.exit(run(sys.argv[1:]))


def run(argv: list[str] | None = None) -> int:
    """Run keyprep with a command line (without the program name); return the exit code."""
    from .parser import parse_args

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ['train']:  # ``keyprep train <model> ...``
        from .train import run_train

        return run_train(args[1:])

    try:
        opts = parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version, usage errors (64), level (17)
        return int(exc.code or 0)
    except KeyprepError as exc:
        _setup_logging(0)
        LOGGER.error('%s', exc)
        return exc.exit_code
    _setup_logging(opts.verbose_count)
    from contextlib import ExitStack

    from .guard import Interruptions

    with Interruptions(keep_armed=_CONSOLE) as interruptions, ExitStack() as stack:
        opts.interruptions, opts.exit_stack = interruptions, stack
        return _run_level(opts, argv)


def _run_level(opts, argv) -> int:
    try:
        if opts.analysis_level == 'group':
            from .group import run_group
            from .guard import output_lock

            if opts.output_dir.exists():
                prepare_folder(opts.output_dir, 'output_dir')
                opts.exit_stack.enter_context(output_lock(opts.output_dir))
            return run_group(opts.output_dir)
        return _run_participant(opts, argv if argv is not None else sys.argv[1:])
    except KeyprepError as exc:
        LOGGER.error('%s', exc)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # SIGINT or SIGTERM (guard.RunInterrupted)
        LOGGER.error('%s: stopped; every output written so far is complete. Rerun with the '
                     'same --work-dir to resume', getattr(exc, 'signal_name', 'SIGINT'))
        return getattr(exc, 'exit_code', EXIT_SIGINT)
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            return _internal_error(opts, exc)
        where = f' at {exc.filename}' if exc.filename else ''
        LOGGER.error('file system error%s: %s (%s); free space or fix the folder, then rerun '
                     'with the same --work-dir to resume', where, exc.strerror or exc,
                     errno.errorcode.get(exc.errno, exc.errno))
        return EXIT_IOERR
    except Exception as exc:  # an internal error: one line here, the traceback in a file
        return _internal_error(opts, exc)


def _internal_error(opts, exc: BaseException) -> int:
    """One line on stderr, the traceback in ``<work_dir>/keyprep-internal-error.txt``."""
    import traceback

    log = opts.work_dir / 'keyprep-internal-error.txt'
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc())
    except OSError:
        log = None
    LOGGER.error('internal error: %s: %s%s', type(exc).__name__, exc,
                 f' (traceback in {log})' if log else '')
    return EXIT_FAILED_NODES


def prepare_folder(path: Path, what: str) -> Path:
    """Create ``path`` (and its parents) if needed and check that files can be created in
    it, by creating and removing an empty file: the only reliable test (``os.access`` says
    yes to root on read-only mounts and pseudo file systems). Raises
    :class:`~keyprep.pipeline.errors.CantCreateError` (exit 73) with one line."""
    import tempfile

    from ..pipeline.errors import CantCreateError

    if path.exists() and not path.is_dir():
        raise CantCreateError(f'{what} {path} exists and is not a folder')
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.keyprep-write-test-', dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise CantCreateError(f'{what} {path} cannot be created or written into: {why}'
                              + (f' ({exc.filename})' if exc.filename and
                                 str(exc.filename) != str(path) else '')) from None
    return path


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else (logging.INFO if verbose == 1 else logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('keyprep: %(message)s'))
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(min(level, logging.INFO))
    LOGGER.propagate = False
    for name in ('nipype.workflow', 'nipype.interface', 'nipype.utils'):
        logging.getLogger(name).setLevel(level if verbose > 1 else logging.WARNING)


def _run_participant(opts, argv: list[str]) -> int:
    from ..pipeline.io import load_image
    from ..pipeline.targets import parse_target
    from ..pipeline.weights import check_run_weights
    from .bids import collect_groups, collect_participants, init_layout, validate_dataset
    from .guard import WorkFolderLock, output_lock
    from .outputs import write_dataset_files, write_run_config

    check_run_weights(opts)  # every learned model's weights: 66/65 before anything runs
    t0 = time.time()
    run_uuid = f'{time.strftime("%Y%m%d-%H%M%S")}_{uuid.uuid4()}'
    out_dir, work_dir, bids_dir = opts.output_dir, opts.work_dir, opts.bids_dir

    target = parse_target(opts.target)
    if getattr(opts, 'use_plugin', None):
        _load_plugin_file(opts.use_plugin)  # a bad plugin file stops the run before it starts
    # Environment problems next, before any validation or indexing: exit 73.
    prepare_folder(work_dir, 'the work folder')
    if opts.bids_database_dir:
        prepare_folder(Path(opts.bids_database_dir), '--bids-database-dir')
    prepare_folder(out_dir, 'output_dir')
    # One run per work folder (and pybids database) at a time: exit 75 at once otherwise.
    hold = getattr(opts, 'exit_stack', None)
    locks = [WorkFolderLock(work_dir)]
    if opts.bids_database_dir and Path(opts.bids_database_dir) != work_dir:
        locks.append(WorkFolderLock(Path(opts.bids_database_dir), '--bids-database-dir'))
    for lock in locks:
        lock.acquire()
        if hold is not None:
            hold.callback(lock.release)

    index_subjects = None
    if opts.participant_label:
        index_subjects = list(opts.participant_label)
        if target.subject and target.subject not in index_subjects:
            index_subjects.append(target.subject)
    if not opts.skip_bids_validation:  # the official validator; its report in logs/<run>/
        validate_dataset(bids_dir, index_subjects,
                         report_file=out_dir / 'logs' / run_uuid / 'bids_validation.json')
    elif not any(p.is_dir() for p in bids_dir.glob('sub-*')):
        from ..pipeline.errors import ValidationError

        raise ValidationError(f'{bids_dir} is not a BIDS dataset: no sub-<label> folders')
    db_dir = opts.bids_database_dir or (work_dir / 'bids_db')
    layout = init_layout(bids_dir, Path(db_dir), index_subjects)
    subjects = collect_participants(bids_dir, opts.participant_label)

    target_file, skip_source = _resolve_target_file(layout, target)
    notes: list[str] = []  # header problems that were resolved (qform/sform conflicts)
    if target_file is not None:  # a bad target stops everything
        from ..pipeline.errors import ImageError

        try:
            load_image(target_file, what='target image', warnings=notes)
        except ImageError as exc:
            raise ImageError(f'--target: {exc}') from None

    groups = collect_groups(layout, subjects, opts.session_label, opts.bids_filters)
    for group in groups:
        valid = []
        for image in group.images:
            try:
                load_image(image.path, warnings=notes)
                valid.append(image)
            except KeyprepError as exc:
                group.errors.append((str(exc), exc.exit_code))
        group.images = valid
    for note in notes:
        LOGGER.warning('%s', note)

    out_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(out_dir):
        write_dataset_files(out_dir, bids_dir, opts.methods)
    errors_by_subject: dict[str, list[tuple[str, int]]] = {}
    for group in groups:
        for msg, code in group.errors:
            LOGGER.error('%s', msg)
            errors_by_subject.setdefault(group.subject, []).append((msg, code))
    runnable = [g for g in groups if g.images]
    if target.kind == 'groupwise' and len({g.subject for g in runnable}) < 2:
        from ..pipeline.errors import UsageError

        raise UsageError('--target groupwise needs usable images of at least two participants')
    from .reports import generate_reports, write_boilerplate

    subjects_run = sorted({g.subject for g in groups})
    if opts.reports_only:
        failed = generate_reports(out_dir, subjects_run, run_uuid=None, input_errors={})
        return EXIT_OK if not failed else EXIT_FAILED_NODES

    from ..workflows.base import init_keyprep_wf

    device = _device(opts.device)
    wf = init_keyprep_wf(
        groups=runnable, target=target, target_file=target_file, skip_source=skip_source,
        methods=opts.methods, bids_dir=bids_dir, output_dir=out_dir, work_dir=work_dir,
        run_uuid=run_uuid, skull_strip=opts.skull_strip,
        skull_strip_method=opts.skull_strip_method, omp_nthreads=opts.omp_nthreads,
        device=device, seed=opts.random_seed, sloppy=opts.sloppy,
        engine_params=getattr(opts, 'engine_params', None),
        keymorph_weights=(str(opts.keymorph_weights)
                          if getattr(opts, 'keymorph_weights', None) else None))
    if not opts.boilerplate_only:
        _check_memory(wf, opts, runnable, target, target_file)
    with output_lock(out_dir):
        write_boilerplate(out_dir, opts.methods, target, opts.skull_strip_method,
                          getattr(opts, 'engine_params', None))
    from ..workflows.registration import method_variants

    variants = {m: [v for v, _ in method_variants(m, opts.engine_params.get(m), opts.sloppy)]
                for m in opts.methods}
    config = {
        'version': __version__, 'run_uuid': run_uuid, 'command': ['keyprep', *argv],
        'bids_dir': str(bids_dir), 'output_dir': str(out_dir), 'work_dir': str(work_dir),
        'participants': subjects_run, 'methods': opts.methods,
        'variants': variants, 'engine_params': opts.engine_params, 'target': opts.target,
        'target_file': str(target_file) if target_file is not None else None,
        'skull_strip': opts.skull_strip,
        'skull_strip_method': opts.skull_strip_method,
        'device': opts.device, 'nprocs': opts.nprocs, 'omp_nthreads': opts.omp_nthreads,
        'mem_gb': opts.mem, 'random_seed': opts.random_seed, 'sloppy': opts.sloppy,
        'weights': getattr(opts, 'weights', None),
    }
    for subject in subjects_run:
        write_run_config(out_dir / f'sub-{subject}' / 'log' / run_uuid, config,
                         errors_by_subject.get(subject, []))
    if opts.boilerplate_only:
        LOGGER.info('boilerplate written to %s', out_dir / 'logs')
        codes = [code for errs in errors_by_subject.values() for _, code in errs]
        return next((c for c in _EXIT_PRIORITY if c in codes), EXIT_OK)
    (out_dir / 'logs' / run_uuid).mkdir(parents=True, exist_ok=True)

    crashed = interrupted = False
    try:
        if runnable:
            crashed = not _run_workflow(wf, opts, out_dir / 'logs' / run_uuid, device)
    except KeyboardInterrupt:  # SIGINT/SIGTERM: no QC completion, no report, no false fail
        from .guard import drop_interrupt_crash_files, terminate_descendants

        interrupted = True
        terminate_descendants()
        drop_interrupt_crash_files([*out_dir.glob(f'sub-*/log/{run_uuid}'),
                                    out_dir / 'logs' / run_uuid])
        raise
    finally:
        if not interrupted:
            crash_files = sorted(out_dir.glob(f'sub-*/log/{run_uuid}/crash-*')) + \
                sorted((out_dir / 'logs' / run_uuid).glob('crash-*'))
            if crash_files:
                from ..workflows.base import workflow_name
                from .qctables import complete_qc_tables, crashed_nodes

                complete_qc_tables(out_dir=out_dir, work_dir=work_dir,
                                   wf_name=workflow_name(), groups=runnable,
                                   methods=opts.methods, variants=variants,
                                   target=target.name, bids_dir=bids_dir,
                                   skip_source=skip_source,
                                   crashes=crashed_nodes(crash_files),
                                   since=t0 if opts.stop_on_first_crash else None)
            failed_reports = generate_reports(out_dir, subjects_run, run_uuid=run_uuid,
                                              input_errors=errors_by_subject)
    codes = []
    if crash_files or crashed or failed_reports:
        codes.append(EXIT_FAILED_NODES)
        for f in crash_files:
            LOGGER.error('node failed, see %s', f)
    codes += [code for errs in errors_by_subject.values() for _, code in errs]
    code = next((c for c in _EXIT_PRIORITY if c in codes), EXIT_OK)
    minutes = (time.time() - t0) / 60
    if code == EXIT_OK:
        LOGGER.info('keyprep finished successfully in %.1f min; reports: %s', minutes,
                    ', '.join(str(out_dir / f'sub-{s}.html') for s in subjects_run))
    else:
        LOGGER.error('keyprep finished with errors (exit code %d) in %.1f min; see the '
                     'reports: %s', code, minutes,
                     ', '.join(str(out_dir / f'sub-{s}.html') for s in subjects_run))
    return code


def _check_memory(wf, opts, groups, target, target_file) -> None:
    """Give every node a memory estimate from the size of its images, refuse (exit 64) a
    node that needs more than ``--mem`` (or, without it, than the machine has), and say
    when ``--mem`` lowers how many heavy nodes run at once (:mod:`keyprep.pipeline.memory`).
    """
    from ..pipeline.memory import Geometry, apply_memory_estimates, check_budget
    from ..pipeline.targets import template_file

    if target_file is not None:
        geom = Geometry.of(target_file)
    else:  # groupwise: a template on the bundled template's field of view
        geom = Geometry.of(template_file('MNI152NLin2009aSym'))
        if geom is not None:
            geom = geom.resampled(float(target.resolution or 1.0))
    if geom is not None and target_file is not None and target.resolution:
        geom = geom.resampled(float(target.resolution))
    estimates = apply_memory_estimates(wf, groups, geom)
    note = check_budget(estimates, opts.mem, nprocs=opts.nprocs,
                        omp_nthreads=opts.omp_nthreads)
    if note:
        LOGGER.warning('%s', note)


def _device(device: str) -> str:
    from ..pipeline.resources import resolve_device

    return resolve_device(device)


def _resolve_target_file(layout, target):
    """The image file of the target; for ``sub-<label>``, that subject's first T1w; ``None``
    for ``groupwise`` (the workflow builds it)."""
    from ..pipeline.errors import MissingInputError

    if target.kind == 'groupwise':
        return None, None
    if target.kind != 'subject':
        return Path(target.path), None
    files = layout.get(subject=target.subject, datatype='anat', suffix='T1w',
                       extension=['.nii', '.nii.gz'], return_type='filename')
    if not files:
        raise MissingInputError(f'--target sub-{target.subject}: that participant has no T1w '
                                'image in the dataset')
    path = Path(sorted(files)[0])
    return path, path


def gpu_plugin_args(wf, device: str, n_gpus: int | None = None) -> dict:
    """GPU scheduling of the torch nodes for Nipype's MultiProc; ``{}`` off CUDA.

    A node is a GPU node when its interface has ``use_gpu=True`` (the workflows set it on
    torch nodes when ``device`` is CUDA). On CUDA, MultiProc gets one GPU slot per visible
    GPU (``n_gpu_procs``) and every GPU node takes one slot (``n_procs=1``: its work runs
    on the device, so it holds a GPU slot, not ``--omp-nthreads`` CPU slots), so at most
    as many torch nodes run at once as there are GPUs. With the device ``cuda`` and
    several GPUs, the nodes are spread over ``cuda:0``... ``cuda:N-1`` in turn; a
    device with an index (``cuda:1``) is one GPU. Host memory (``mem_gb``) is unchanged.
    On the CPU nothing is changed and nothing is returned.

    Parameters
    ----------
    wf
        The workflow, before it runs (GPU nodes are changed in place).
    device
        The resolved torch device (``cpu``, ``cuda``, ``cuda:N``).
    n_gpus
        GPUs visible to this process; default ``torch.cuda.device_count()`` (which
        honours ``CUDA_VISIBLE_DEVICES``, as set by SLURM's ``--gpus``).
    """
    if not device.startswith('cuda'):
        return {}
    if ':' in device:
        n_gpus = 1
    elif n_gpus is None:
        import torch

        n_gpus = torch.cuda.device_count()
    n_gpus = max(1, int(n_gpus))
    gpu_nodes = [wf.get_node(name) for name in wf.list_node_names()]
    gpu_nodes = [node for node in gpu_nodes if node is not None and node.is_gpu_node()]
    for i, node in enumerate(gpu_nodes):
        node.n_procs = 1
        if device == 'cuda' and n_gpus > 1 and hasattr(node.inputs, 'device'):
            node.inputs.device = f'cuda:{i % n_gpus}'  # nohash: the cache is unaffected
    LOGGER.info('GPU scheduling: %d torch node(s), at most %d at once (%s)',
                len(gpu_nodes), n_gpus, device)
    return {'n_gpu_procs': n_gpus}


def _load_plugin_file(path: Path) -> tuple[str, dict]:
    """``--use-plugin``: a YAML or JSON file ``{plugin: NAME, plugin_args: {...}}``."""
    import yaml

    from ..pipeline.errors import UsageError

    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f'--use-plugin: cannot read {path}: {exc}') from None
    if not isinstance(spec, dict) or not isinstance(spec.get('plugin'), str):
        raise UsageError(f'--use-plugin: {path} must hold {{plugin: NAME, plugin_args: '
                         '{...}}, e.g. plugin: SLURM')
    args = spec.get('plugin_args') or {}
    if not isinstance(args, dict):
        raise UsageError(f'--use-plugin: plugin_args in {path} must be a mapping')
    return spec['plugin'], dict(args)


def _run_workflow(wf, opts, target_crash_dir: Path, device: str = 'cpu') -> bool:
    """Run the graph (MultiProc, Linear with one process, or the ``--use-plugin`` plugin);
    True if every node succeeded."""
    from nipype import config as ncfg
    from nipype import logging as nlogging

    ncfg.update_config({
        'execution': {
            'crashfile_format': 'txt',
            'hash_method': 'content',
            'stop_on_first_crash': opts.stop_on_first_crash,
            'remove_unnecessary_outputs': False,
            'check_version': False,
            'get_linked_libs': False,
            'crashdump_dir': str(target_crash_dir),
            'poll_sleep_duration': 0.2,
        },
        'monitoring': {'enabled': False},
        'logging': {'workflow_level': 'INFO' if opts.verbose_count > 1 else 'WARNING',
                    'interface_level': 'INFO' if opts.verbose_count > 1 else 'WARNING',
                    'utils_level': 'WARNING'},
    })
    nlogging.update_logging(ncfg)
    wf.config['execution'].update({
        'crashfile_format': 'txt', 'hash_method': 'content',
        'stop_on_first_crash': opts.stop_on_first_crash, 'remove_unnecessary_outputs': False,
    })
    for node_name in wf.list_node_names():
        node = wf.get_node(node_name)
        if node is not None and not (node.config or {}).get('execution', {}).get('crashdump_dir'):
            node.config = node.config or {}
            node.config.setdefault('execution', {})['crashdump_dir'] = str(target_crash_dir)
    if opts.write_graph:
        wf.write_graph(graph2use='colored', format='svg', simple_form=True)
    # Worker processes inherit these before any of them imports ANTs (ITK reads its thread
    # count once, at import) or torch.
    for var in ('ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
        os.environ[var] = str(opts.omp_nthreads)
    plugin_args = {'n_procs': opts.nprocs, 'raise_insufficient': False,
                   'maxtasksperchild': 1}
    if opts.mem:
        plugin_args['memory_gb'] = opts.mem
    plugin_args.update(gpu_plugin_args(wf, device))
    plugin = 'Linear' if opts.nprocs == 1 else 'MultiProc'
    if getattr(opts, 'use_plugin', None):
        plugin, extra = _load_plugin_file(opts.use_plugin)
        plugin_args = {**plugin_args, **extra} if plugin == 'MultiProc' else extra
        LOGGER.info('Nipype plugin %s from %s', plugin, opts.use_plugin)
    # After SIGINT/SIGTERM no node starts, and the interrupted one is no failure (the guard's
    # callback, first); then the progress lines (keyprep.bids_app.progress).
    from .progress import Progress

    interruptions = getattr(opts, 'interruptions', None)
    progress = Progress(wf, verbose=opts.verbose_count, plugin=plugin,
                        then=interruptions.status_callback if interruptions else None)
    callback = {'status_callback': progress.status_callback}
    try:
        with progress:
            if plugin == 'Linear':
                wf.run(plugin='Linear', plugin_args=callback)
            else:
                if plugin == 'MultiProc':
                    plugin_args = {**plugin_args, **callback}
                elif not plugin.endswith('Graph') and plugin != 'DAGMan':
                    # batch plugins (SLURM...) report node status too; graph ones cannot
                    plugin_args = {**plugin_args, 'status_callback': progress.status_callback}
                wf.run(plugin=plugin, plugin_args=plugin_args)
    except (RuntimeError, OSError) as exc:
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        LOGGER.error('workflow did not finish cleanly (%s)',
                     lines[-1].strip() if lines else type(exc).__name__)
        return False
    return True


if __name__ == '__main__':  # pragma: no cover
    main()

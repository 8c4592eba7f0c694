"""BIDS queries: validation, the pybids layout, and the anatomical images to process."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..pipeline.errors import (
    EXIT_NO_INPUT,
    EXIT_NO_MATCH,
    KeyprepError,
    MissingInputError,
    NoMatchError,
    ValidationError,
)

__all__ = [
    'ANAT_QUERIES',
    'AnatImage',
    'ProcessingGroup',
    'collect_groups',
    'collect_participants',
    'init_layout',
    'validate_dataset',
]

LOGGER = logging.getLogger('keyprep')

#: Default queries; ``--bids-filter-file`` may refine each key.
ANAT_QUERIES: dict[str, dict] = {
    't1w': {'datatype': 'anat', 'suffix': 'T1w'},
    't2w': {'datatype': 'anat', 'suffix': 'T2w'},
    'pdw': {'datatype': 'anat', 'suffix': 'PDw'},
    'flair': {'datatype': 'anat', 'suffix': 'FLAIR'},
}


@dataclass
class AnatImage:
    """One anatomical image to register."""

    path: Path
    suffix: str
    subject: str
    session: str | None
    error: str | None = None
    exit_code: int = 0

    @property
    def key(self) -> str:
        """A node-name-safe identifier unique within a subject."""
        stem = self.path.name.split('.')[0]
        return re.sub(r'[^A-Za-z0-9]', '_', stem.replace(f'sub-{self.subject}_', ''))


@dataclass
class ProcessingGroup:
    """A subject, or a subject's session: one QC table and one section of the report."""

    subject: str
    session: str | None
    images: list[AnatImage] = field(default_factory=list)
    errors: list[tuple[str, int]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f'sub_{self.subject}' + (f'_ses_{self.session}' if self.session else '')


#: Errors listed in the one-line message (the report holds them all).
_LISTED_ERRORS = 3


def validate_dataset(bids_dir: Path, participants: list[str] | None = None,
                     report_file: Path | None = None) -> dict:
    """Validate ``bids_dir`` with the official BIDS validator; raise
    :class:`ValidationError` (exit 16) on errors, log a one-line summary otherwise.

    Quick checks first, for clearer messages: ``dataset_description.json`` present, valid
    JSON, with ``Name`` and ``BIDSVersion``, and ``sub-*`` folders. Then the schema-based
    validator (``bids-validator-deno``, the validator of the NiPreps; offline, its bundled
    schema) checks the whole dataset: it has no option to check some participants only.
    Only errors stop the run, and only those in the selected ``participants``' folders or
    outside any participant folder (``participants.tsv``...); errors in the folders of
    participants that are not selected are counted, reported and ignored, as the
    NiPreps' ``ignoredFiles``. Warnings never stop a run. The validator's JSON report (with
    a ``keyprep`` key: validator version, time, what was counted) is written atomically to
    ``report_file`` when given (never into the dataset).

    Raises :class:`~keyprep.pipeline.errors.MissingInputError` (exit 66) when the
    validator (the ``bids-validator-deno`` package, a dependency of keyprep) is missing.
    Returns the ``keyprep`` summary.
    """
    desc = bids_dir / 'dataset_description.json'
    if not desc.is_file():
        raise ValidationError(f'{bids_dir} is not a BIDS dataset: dataset_description.json is '
                              'missing (use --skip-bids-validation to go on anyway)')
    try:
        meta = json.loads(desc.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValidationError(f'dataset_description.json is not valid JSON: {exc}') from None
    missing = [k for k in ('Name', 'BIDSVersion') if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValidationError(f'dataset_description.json lacks the required field(s) '
                              f'{", ".join(missing)}')
    subjects = sorted(p for p in bids_dir.glob('sub-*') if p.is_dir())
    if not subjects:
        raise ValidationError(f'{bids_dir} is not a BIDS dataset: no sub-<label> folders')

    t0 = time.monotonic()
    raw, version = _run_validator(bids_dir)
    seconds = time.monotonic() - t0
    issues = raw.get('issues', {}).get('issues', []) if isinstance(raw, dict) else []
    selected = set(participants or [])

    def other_participant(issue: dict) -> bool:
        m = re.match(r'/sub-([^/_]+)/', str(issue.get('location') or ''))
        return bool(selected and m and m.group(1) not in selected)

    def distinct(severity: str, keep) -> list[dict]:
        seen: dict[tuple, dict] = {}
        for issue in issues:
            if issue.get('severity') == severity and keep(issue):
                seen.setdefault((issue.get('code'), issue.get('subCode'),
                                 issue.get('location')), issue)
        return list(seen.values())

    errors = distinct('error', lambda i: not other_participant(i))
    ignored = distinct('error', other_participant)
    warnings = distinct('warning', lambda i: True)
    summary = {'validator': f'bids-validator-deno {version}', 'seconds': round(seconds, 2),
               'participants': sorted(selected) or 'all', 'errors': len(errors),
               'errors_ignored_other_participants': len(ignored),
               'warnings': len(warnings)}
    where = ''
    if report_file is not None:
        from ..pipeline.io import atomic_write_text

        atomic_write_text(report_file, json.dumps({'keyprep': summary, **raw}, indent=1) + '\n')
        where = f'; full report: {report_file}'
    others = (f' (and {len(ignored)} in participants not selected, ignored)'
              if ignored else '')
    if errors:
        listed = ', '.join(
            f'{i.get("code")}{"[" + str(i["subCode"]) + "]" if i.get("subCode") else ""}'
            f' {str(i.get("location") or "").lstrip("/")}'.rstrip()
            for i in errors[:_LISTED_ERRORS])
        more = f' and {len(errors) - _LISTED_ERRORS} more' if len(errors) > _LISTED_ERRORS else ''
        raise ValidationError(
            f'BIDS validation: {len(errors)} error(s) ({listed}{more}){others}, '
            f'{len(warnings)} warning(s){where}; fix the dataset, or use '
            '--skip-bids-validation to go on anyway')
    LOGGER.info('BIDS validation: 0 errors%s, %d warning(s) (%s, %.1f s%s)', others,
                len(warnings), summary['validator'], seconds, where)
    return summary


def _run_validator(bids_dir: Path) -> tuple[dict, str]:
    """Run ``bids-validator-deno`` on ``bids_dir`` (JSON output) and return its report and
    version. Offline: its bundled schema (``BIDS_SCHEMA``, which would make it download
    another, is removed from its environment) and no Deno update check."""
    import os
    import subprocess
    import sys
    from importlib import metadata, util

    def importable(module: str) -> bool:
        try:
            return util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False

    # the validator and the Deno runtime it runs on (a dependency of bids-validator-deno)
    for module in ('bids_validator_deno', 'deno'):
        if not importable(module):
            raise MissingInputError(
                f'the official BIDS validator is not installed (Python module {module!r} is '
                'missing; keyprep needs the package bids-validator-deno: pip install '
                'bids-validator-deno), or use --skip-bids-validation')
    version = metadata.version('bids-validator-deno')
    env = {k: v for k, v in os.environ.items() if k != 'BIDS_SCHEMA'}
    env.update({'DENO_NO_UPDATE_CHECK': '1', 'DENO_NO_PROMPT': '1', 'NO_COLOR': '1'})
    cmd = [sys.executable, '-c',
           'import sys; from bids_validator_deno import cli; sys.argv[0] = '
           '"bids-validator-deno"; sys.exit(cli())', str(bids_dir), '--format', 'json']
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    except OSError as exc:
        raise ValidationError(f'the BIDS validator could not be started: {exc} (use '
                              '--skip-bids-validation to go on without it)') from None
    try:
        report = json.loads(proc.stdout) if proc.returncode in (0, 16) else None
    except json.JSONDecodeError:
        report = None
    if not isinstance(report, dict):
        lines = [ln.strip(' #') for ln in (proc.stderr or proc.stdout or '').splitlines()
                 if ln.strip(' #')]
        fatal = [ln for ln in lines if 'out of memory' in ln.lower()]
        if fatal:  # V8 could not reserve its heap: the validator cannot run here at all
            raise MissingInputError(
                f'the BIDS validator (bids-validator-deno {version}) cannot run here: '
                f'{fatal[0][:160]}{_address_space_note()}; use --skip-bids-validation to '
                'go on without it')
        raise ValidationError(
            f'the BIDS validator (bids-validator-deno {version}) failed on {bids_dir} '
            f'(exit {proc.returncode}: {lines[-1][:200] if lines else "no output"}); use '
            '--skip-bids-validation to go on without it')
    return report, version


def _address_space_note() -> str:
    """The process's address-space limit (``ulimit -v``, a scheduler's ``h_vmem``), if
    any: Deno (V8) reserves far more address space than it uses (it fails to start under
    a limit of 32 GB, starts under 48 GB, on keyprep's test machine)."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft == resource.RLIM_INFINITY:
        return ''
    return (f' (an address-space limit of {soft / 2 ** 30:.1f} GB is set, ulimit -v; Deno, '
            'which runs the validator, reserves more than 32 GB of address space)')


def init_layout(bids_dir: Path, database_dir: Path, participants: list[str] | None = None):
    """A pybids layout whose SQLite index lives in the work folder."""
    from bids import BIDSLayout, BIDSLayoutIndexer

    ignore = ['code', 'stimuli', 'sourcedata', 'models', 'derivatives',
              re.compile(r'^\.'), re.compile(r'/(beh|dwi|eeg|ieeg|meg|perf|func|fmap|pet)/')]
    if participants:
        ignore.append(re.compile(r'sub-(?!(%s)(\b|_))' % '|'.join(map(re.escape, participants))))
    # folders named sub-<not a label> (with --skip-bids-validation): pybids would give their
    # files to another participant (sub-01_x/anat/sub-01_x_T1w.nii.gz to sub-01)
    ignore += [p.name for p in Path(bids_dir).glob('sub-*')
               if p.is_dir() and not re.fullmatch(r'sub-[A-Za-z0-9]+', p.name)]
    database_dir.mkdir(parents=True, exist_ok=True)
    indexer = BIDSLayoutIndexer(validate=False, ignore=ignore)
    try:
        return BIDSLayout(str(bids_dir), validate=False, database_path=str(database_dir),
                          reset_database=True, indexer=indexer)
    except Exception as exc:  # pybids raises several types for unreadable datasets
        raise ValidationError(f'pybids cannot index {bids_dir}: {exc}') from None


def collect_participants(bids_dir: Path, labels: list[str] | None) -> list[str]:
    """Selected participants, as in niworkflows: all when no labels are given, an error
    when none of the requested labels exist, a warning when some are missing.

    Participants are the ``sub-<label>`` folders, so that one without any anatomical
    image is reported as such instead of silently ignored; ``sub-*`` folders whose names
    are not valid labels are skipped with a warning that names them.
    """
    folders = sorted(p.name for p in Path(bids_dir).glob('sub-*') if p.is_dir())
    available = [f[4:] for f in folders if re.fullmatch(r'sub-[A-Za-z0-9]+', f)]
    invalid = [f for f in folders if not re.fullmatch(r'sub-[A-Za-z0-9]+', f)]
    if invalid:  # files in them fail validation; with --skip-bids-validation, say so
        LOGGER.warning('skipped: %d folder(s) whose names are not valid participant labels '
                       '(sub-<letters and digits>): %s', len(invalid), ', '.join(invalid))
    if not available:
        raise NoMatchError('the dataset has no participants')
    if not labels:
        return available
    wanted = sorted(dict.fromkeys(labels))
    found = [s for s in wanted if s in available]
    missing = [s for s in wanted if s not in available]
    if not found:
        raise NoMatchError(f'none of the requested participants were found: '
                           f'{", ".join("sub-" + s for s in missing)}')
    if missing:
        LOGGER.warning('participants not found and skipped: %s',
                       ', '.join('sub-' + s for s in missing))
    return found


def collect_groups(layout, subjects: list[str], sessions: list[str] | None = None,
                   filters: dict | None = None) -> list[ProcessingGroup]:
    """Anatomical images of each selected subject, grouped by session.

    A subject without any anatomical image gets an error of its own (exit code 66, or 18
    when filters or session labels excluded its images); the others go on.
    """
    filters = filters or {}
    unknown = sorted(set(filters) - set(ANAT_QUERIES))
    if unknown:
        raise KeyprepError(f'unknown query key(s) in --bids-filter-file: {", ".join(unknown)}; '
                           f'use {", ".join(ANAT_QUERIES)}', 64)
    filtered = bool(filters) or bool(sessions)
    groups: list[ProcessingGroup] = []
    total = 0
    for subject in subjects:
        found: dict[str | None, list[AnatImage]] = {}
        for key, query in ANAT_QUERIES.items():
            q = {**query, **_clean_filter(filters.get(key, {}))}
            if sessions:
                q['session'] = sessions
            files = layout.get(subject=subject, extension=['.nii', '.nii.gz'],
                               return_type='object', **q)
            for f in sorted(files, key=lambda f: f.path):
                ses = f.entities.get('session')
                found.setdefault(ses, []).append(
                    AnatImage(Path(f.path), f.entities['suffix'], subject, ses))
        if not found:
            code = EXIT_NO_MATCH if filtered else EXIT_NO_INPUT
            why = ('no anatomical image matches the session labels/filters' if filtered
                   else 'no anatomical image (T1w, T2w, PDw, FLAIR) found')
            groups.append(ProcessingGroup(subject, None, [], [(f'sub-{subject}: {why}', code)]))
            continue
        for ses in sorted(found, key=lambda s: s or ''):
            groups.append(ProcessingGroup(subject, ses, found[ses]))
            total += len(found[ses])
    if total == 0:
        if filtered:
            raise NoMatchError('the session labels/BIDS filters selected no anatomical image')
        raise MissingInputError('no anatomical image (T1w, T2w, PDw, FLAIR) in the selected '
                                'participants')
    return groups


def _clean_filter(query: dict) -> dict:
    """pybids query from JSON: ``null`` -> Query.NONE, ``"*"`` -> Query.ANY."""
    from bids.layout import Query

    out = {}
    for key, value in query.items():
        if value is None:
            out[key] = Query.NONE
        elif value == '*':
            out[key] = Query.ANY
        else:
            out[key] = value
    return out

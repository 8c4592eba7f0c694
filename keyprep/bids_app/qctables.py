"""QC tables that survive a failed engine.

Nipype runs nothing downstream of a failed node, so when one engine crashes the workflow's
own table node never runs. After such a run, this module writes the participant's tables
from the QC rows of the engines that finished (their nodes' outputs in the work folder)
plus one ``fail`` row for each registration that did not, naming the crash file. Where
those outputs and nodes are is published by the workflow (:mod:`keyprep.workflows.layout`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from ..pipeline.io import atomic_write_text
from ..pipeline.qcreport import (
    LONG_COLUMNS,
    LONG_DESCRIPTION,
    SUMMARY_COLUMNS,
    SUMMARY_DESCRIPTION,
    table_sidecar,
)
from ..workflows.layout import group_prefixes, qc_sources, shared_prefixes
from .naming import bids_uri, qc_table_name

__all__ = ['crashed_nodes', 'complete_qc_tables']

LOGGER = logging.getLogger('keyprep')


def crashed_nodes(crash_files: list[Path]) -> dict[str, Path]:
    """Full node names (``keyprep_0_1_wf.sub_01_wf...register``) -> their crash file."""
    out = {}
    for f in crash_files:
        for line in f.read_text(errors='replace').splitlines():
            if line.startswith('Node:'):
                out[line.split(':', 1)[1].strip()] = f
                break
    return out


def complete_qc_tables(*, out_dir: Path, work_dir: Path, wf_name: str, groups, methods,
                       target: str, bids_dir: Path, skip_source: Path | None,
                       crashes: dict[str, Path], since: float | None = None,
                       variants: dict[str, list[str]] | None = None) -> list[Path]:
    """Write the QC tables of every participant whose workflow had a failed node.

    With ``since`` (a time stamp: the run stopped at its first crash, so nodes after it may
    not have run), only QC outputs written after it are used; older ones could belong to
    earlier inputs, and those registrations are marked as not completed.

    ``variants`` (engine -> its variant names, when an engine gives several): each variant
    gets its row, from ``reg_<image>_<engine>_wf/<variant>_wf/qc``; a crash of the engine's
    own nodes (``register``...) fails all its variants, a crash in a variant's chain only
    that variant. Node names and folders come from the workflow's own
    :func:`keyprep.workflows.layout.qc_sources`, which the builders name their nodes with.
    """
    written = []
    shared = shared_prefixes(wf_name)
    target_failed = any(n.startswith(shared) for n in crashes)
    for group in groups:
        if not group.images or not (target_failed or any(
                n.startswith(group_prefixes(wf_name, group.name)) for n in crashes)):
            continue
        longs, summaries = [], []
        for image in group.images:
            if skip_source is not None and image.path.resolve() == Path(skip_source).resolve():
                continue
            for source in qc_sources(wf_name, group.name, image.key, methods, variants):
                failed = source.failures(crashes)
                long_file, summary_file = source.files(work_dir)
                fresh = summary_file.exists() and (
                    since is None or summary_file.stat().st_mtime >= since)
                if not failed and not target_failed and fresh:
                    longs.append(pd.read_csv(long_file, sep='\t', keep_default_na=False))
                    summaries.append(pd.read_csv(summary_file, sep='\t',
                                                 keep_default_na=False))
                    continue
                where = (f'{failed[0].relative_to(out_dir)}' if failed
                         else 'the crash files of this run')
                summaries.append(pd.DataFrame([{
                    'participant_id': f'sub-{group.subject}',
                    'session_id': f'ses-{group.session}' if group.session else 'n/a',
                    'source': bids_uri(image.path, bids_dir), 'method': source.method,
                    'target': target, 'status': 'fail',
                    'status_reason': f'the registration did not complete: see {where}',
                }], columns=list(SUMMARY_COLUMNS)))
        for desc, frames, cols, text in (
                ('registration', longs, LONG_COLUMNS, LONG_DESCRIPTION),
                ('registrationsummary', summaries, SUMMARY_COLUMNS, SUMMARY_DESCRIPTION)):
            df = (pd.concat(frames, ignore_index=True) if frames
                  else pd.DataFrame(columns=list(cols)))
            path = out_dir / qc_table_name(group.subject, group.session, desc)
            atomic_write_text(path, df.to_csv(sep='\t', index=False, na_rep='n/a'))
            atomic_write_text(path.with_suffix('.json'),
                              json.dumps(table_sidecar(cols, text), indent=2) + '\n')
            written.append(path)
        LOGGER.warning('sub-%s: QC tables written with the failed registrations marked fail',
                       group.subject)
    return written

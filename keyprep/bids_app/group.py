"""Group level: merge the participants' QC tables and plot them."""

from __future__ import annotations

import html
import json
import logging
import tempfile
import time
from pathlib import Path

from .. import __version__
from ..pipeline.errors import EXIT_OK, MissingInputError
from ..pipeline.io import atomic_write_text

__all__ = ['run_group']

LOGGER = logging.getLogger('keyprep')


def run_group(output_dir: Path) -> int:
    """Write ``group_desc-registration_qc.tsv``, ``group_desc-registrationsummary_qc.tsv``
    (with JSON sidecars) and ``group.html`` into ``output_dir``."""
    from ..pipeline.figures import plot_group, png_to_data_uri
    from ..pipeline.qcreport import (LONG_COLUMNS, SUMMARY_COLUMNS, concat_tables, labels_aligned,
                                     table_sidecar)
    from .reports import _DATA, _sort_methods, _table_html, method_order

    if not output_dir.is_dir():
        raise MissingInputError(f'output_dir does not exist: {output_dir}; run the '
                                'participant level first')
    tables = {}
    for desc, cols, text in (
            ('registration', LONG_COLUMNS, 'Registration QC of all participants: Dice per '
                                           'engine and label (label_set synthseg: the '
                                           'structures of the label network; tissue: the '
                                           'tissue classes)'),
            ('registrationsummary', SUMMARY_COLUMNS, 'Registration QC summary of all '
                                                     'participants: one row per engine and '
                                                     'image')):
        files = sorted(output_dir.glob(f'sub-*/**/anat/sub-*_desc-{desc}_qc.tsv'))
        if not files:
            raise MissingInputError(f'no sub-*_desc-{desc}_qc.tsv tables in {output_dir}; run '
                                    'the participant level first')
        df = concat_tables(files)
        tables[desc] = df
        out = output_dir / f'group_desc-{desc}_qc.tsv'
        atomic_write_text(out, df.to_csv(sep='\t', index=False, na_rep='n/a'))
        atomic_write_text(out.with_suffix('.json'),
                          json.dumps(table_sidecar(cols, text), indent=2) + '\n')
        LOGGER.info('wrote %s (%d rows from %d tables)', out, len(df), len(files))

    summary = tables['registrationsummary']
    order = method_order(summary['method'].astype(str), _run_methods(output_dir))
    figs = []
    # engines that aligned the label network's labels: their structure Dice is not independent
    aligned = sorted(set(summary.loc[labels_aligned(summary), 'method'].astype(str)))
    notes = {'structure_dice_mean': (
        f' ({", ".join(aligned)}: the engine aligned these labels, so this Dice is not an '
        'independent check; see the tissue Dice)' if aligned else '')}
    with tempfile.TemporaryDirectory() as tmp:
        for metric, caption in (('structure_dice_mean', 'Mean structure Dice (label network) per engine'),
                                ('tissue_dice_mean', 'Mean tissue-class Dice (GM, WM, CSF) per engine'),
                                ('runtime_s', 'Registration wall time per engine (s)'),
                                ('jac_neg_frac', 'Fraction of folding voxels per engine'),
                                ('peak_mem_mb', 'Peak memory per engine (MiB)')):
            if metric not in summary or summary[metric].isna().all():
                continue
            png = Path(tmp) / f'{metric}.png'
            plot_group(summary, png, metric=metric, by='method', title=caption, order=order)
            figs.append((caption + notes.get(metric, ''), png_to_data_uri(png)))
    for col in ('tissue_dice_mean', 'structure_dice_mean', 'label_set'):
        if col not in summary:  # tables written before these columns existed
            summary = summary.assign(**{col: float('nan')})
    agg = summary.groupby('method').agg(
        n=('dice_mean', 'size'),
        label_set=('label_set', lambda s: '/'.join(sorted({str(v) for v in s.dropna()})) or 'n/a'),
        dice_mean=('dice_mean', 'mean'), dice_min=('dice_min', 'min'),
        structure_dice_mean=('structure_dice_mean', 'mean'),
        tissue_dice_mean=('tissue_dice_mean', 'mean'),
        jac_neg_frac_max=('jac_neg_frac', 'max'), runtime_s_median=('runtime_s', 'median'),
        peak_mem_mb_max=('peak_mem_mb', 'max'),
        n_pass=('status', lambda s: int((s == 'pass').sum())),
        n_warn=('status', lambda s: int((s == 'warn').sum())),
        n_fail=('status', lambda s: int((s == 'fail').sum()))).reset_index().round(4)
    agg = _sort_methods(agg, order)
    body = [f'<h1>keyprep group report</h1><p>{summary["participant_id"].nunique()} '
            f'participant(s), {len(summary)} registration(s); keyprep {__version__}; '
            f'{time.strftime("%Y-%m-%d %H:%M:%S")}</p>',
            '<section id="engines"><h2>Per engine</h2>', _table_html(agg),
            '<p>Dice is the Dice that sets the status, over the label set named in the '
            'tables (synthseg: the structures of the label network present in the target, '
            'once the network is trusted; else tissue); means over the registrations of each '
            'engine.</p></section>',
            '<section id="structures"><h2>Per structure</h2>',
            _structure_table(tables['registration'], order), '</section>',
            '<section id="plots"><h2>Plots</h2>']
    for caption, uri in figs:
        body.append(f'<figure><figcaption>{html.escape(caption)}</figcaption>'
                    f'<img src="{uri}" alt="{html.escape(caption)}"></figure>')
    body.append('</section><section id="table"><h2>All registrations</h2>')
    cols = [c for c in ('participant_id', 'session_id', 'source', 'method', 'label_set', 'dice_mean',
                        'dice_min', 'structure_dice_mean', 'tissue_dice_mean', 'jac_min', 'jac_neg_frac',
                        'logjac_std', 'runtime_s', 'peak_mem_mb', 'status', 'status_reason')
            if c in summary]
    shown = summary[cols].copy()
    shown['source'] = shown['source'].astype(str).str.rsplit('/', n=1).str[-1]
    body.append(_table_html(_sort_methods(shown, order), 'status', constants=True))
    body.append('</section>')
    links = ''.join(f'<a href="{p.name}">{p.stem}</a>'
                    for p in sorted(output_dir.glob('sub-*.html')))
    page = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<title>keyprep group report</title><style>{(_DATA / "report.css").read_text()}'
            f'</style></head><body><nav><span class="brand">keyprep {__version__}</span>'
            f'<a href="#engines">Engines</a><a href="#structures">Structures</a>'
            f'<a href="#plots">Plots</a><a href="#table">Table</a>'
            f'{links}</nav><main>' + '\n'.join(body) + '</main></body></html>')
    out = output_dir / 'group.html'
    atomic_write_text(out, page)
    LOGGER.info('group report: %s', out)
    return EXIT_OK


def _run_methods(output_dir: Path) -> list[str]:
    """The engines (variants expanded) of the newest participant run recorded in
    ``output_dir``, in the order of its ``--methods``; empty when none is recorded."""
    configs = sorted(output_dir.glob('sub-*/log/*/keyprep.json'), key=lambda p: p.parent.name)
    for path in reversed(configs):
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        variants = config.get('variants') or {}
        return [v for m in config.get('methods') or [] for v in (variants.get(m) or [m])]
    return []


def _structure_table(long, order: list[str] | None = None) -> str:
    """Mean Dice (over registrations) of every structure, one column per engine."""
    from .reports import _table_html, method_order

    if long is None or long.empty or 'label_set' not in long.columns:
        return '<p>No per-structure Dice in the tables.</p>'
    rows = long[long['label_set'] == 'synthseg']
    if rows.empty:
        return '<p>No per-structure Dice in the tables.</p>'
    keys = ['label_index', 'label_name']
    table = rows.groupby([*keys, 'method'])['dice'].mean().unstack('method')
    table = table[method_order(table.columns, order)]
    table = table.assign(n=rows.groupby(keys)['dice'].count()).reset_index()
    table = table.drop(columns='label_index').rename(columns={'label_name': 'structure'})
    table = table.round(3)
    table.columns.name = None
    return ('<p>Mean Dice over the registrations of each engine (n: registrations with a '
            'value, all engines together).</p>' + _table_html(table))

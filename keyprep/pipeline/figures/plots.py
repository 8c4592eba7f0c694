"""Plots of QC numbers (white background): metrics per engine for the group report, Dice per
structure for the participant report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._common import _DPI, PathLike, _save, _setup_matplotlib

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ['plot_group', 'plot_structure_dice']


def _ordered(values, order: Sequence[str] | None) -> list[str]:
    """``values`` in the order of ``order``, then the others sorted.

    >>> _ordered(['b', 'a', 'c'], ['c', 'b'])
    ['c', 'b', 'a']
    """
    values = [str(v) for v in values]
    first = [o for o in dict.fromkeys(order or []) if o in values]
    return first + sorted(v for v in set(values) if v not in first)


def plot_group(summary: PathLike | pd.DataFrame, out_png: PathLike, metric: str,
               by: str = 'method', title: str | None = None,
               *, pair_by: str = 'participant_id',
               order: Sequence[str] | None = None) -> Path:
    """Strip and box plot of one metric per group (engine) for the group report.

    Parameters
    ----------
    summary : path-like or pandas.DataFrame
        Table with one row per run (a TSV file, or a DataFrame) holding the columns ``by``
        and ``metric``.
    out_png : path-like
        Output PNG file (white background).
    metric : str
        Column to plot (e.g. ``'dice_mean'``, ``'runtime_s'``). Values that are not
        numbers are dropped. Metrics whose name starts with ``'runtime'`` use a log axis
        (non-positive values dropped).
    by : str
        Column that defines the groups (x axis, in the order of ``order``, then sorted).
    title : str, optional
        Title of the plot (default: the metric's name).
    pair_by : str
        When this column exists and identifies at most one row per group, the points of
        the same value (participant) are joined by faint lines across groups (up to 40).
    order : sequence of str, optional
        Order of the groups (e.g. the engines of the run); groups it lacks follow, sorted.

    Returns
    -------
    pathlib.Path
        ``out_png``. With no usable value, a figure that says so is written.

    Raises
    ------
    ValueError
        If the table lacks the ``by`` or ``metric`` column.
    """
    import pandas as pd

    _setup_matplotlib()
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(summary, pd.DataFrame):
        df = summary.copy()
    else:
        df = pd.read_csv(summary, sep='\t')
    for col in (by, metric):
        if col not in df.columns:
            raise ValueError(f'column {col!r} not in the summary table '
                             f'(columns: {", ".join(map(str, df.columns))})')
    df = df.assign(_value=pd.to_numeric(df[metric], errors='coerce'))
    df = df[np.isfinite(df['_value'])]
    log = metric.startswith('runtime')
    if log:
        df = df[df['_value'] > 0]
    df = df.assign(_group=df[by].astype(str))
    groups = _ordered(df['_group'].unique(), order)

    width = float(np.clip(3.0 + 1.1 * len(groups), 6.0, 14.0))
    fig = Figure(figsize=(width, 4.2), dpi=_DPI, facecolor='white')
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.1, 0.2, 0.86, 0.68))
    ax.set_title(title or metric, fontsize=11, loc='left')
    if not groups:
        ax.set_axis_off()
        ax.text(0.5, 0.5, f'no values of {metric!r}', ha='center', va='center',
                transform=ax.transAxes, fontsize=11, color='0.4')
        return _save(fig, out_png)

    colours = colormaps['tab10']
    values = [df.loc[df['_group'] == g, '_value'].to_numpy() for g in groups]
    positions = np.arange(len(groups))
    rng = np.random.default_rng(0)
    jitter = {}
    for i, vals in enumerate(values):
        jitter[i] = rng.uniform(-0.12, 0.12, size=vals.size) if vals.size > 1 else np.zeros(1)

    # paired lines (same participant across groups)
    if pair_by in df.columns and df[pair_by].nunique() <= 40:
        per_group = df.groupby('_group')[pair_by]
        if all(s.is_unique for _, s in per_group):
            xpos = {}
            for i, g in enumerate(groups):
                sub = df[df['_group'] == g]
                for x, key, val in zip(i + jitter[i], sub[pair_by], sub['_value']):
                    xpos.setdefault(key, []).append((x, val))
            for pts in xpos.values():
                if len(pts) > 1:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, color='0.6', alpha=0.35, linewidth=0.7, zorder=1)

    ax.boxplot(values, positions=positions, widths=0.5, showfliers=False, patch_artist=True,
               boxprops={'facecolor': 'none', 'edgecolor': '0.3'},
               medianprops={'color': 'black', 'linewidth': 1.5},
               whiskerprops={'color': '0.3'}, capprops={'color': '0.3'}, zorder=2)
    for i, vals in enumerate(values):
        ax.scatter(i + jitter[i][: vals.size], vals, s=22, color=colours(i % 10),
                   edgecolors='white', linewidths=0.5, alpha=0.9, zorder=3)
    ax.set_xticks(positions)
    ax.set_xticklabels([f'{g}\n(n={v.size})' for g, v in zip(groups, values)], fontsize=9)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    if log:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale('log')
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))
    ax.set_ylabel(metric + (' (log scale)' if log else ''), fontsize=9)
    ax.grid(axis='y', color='0.9', linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)
    for side in ('top', 'right'):
        ax.spines[side].set_visible(False)
    return _save(fig, out_png)


def plot_structure_dice(long: PathLike | pd.DataFrame, out_png: PathLike,
                        title: str | None = None, *, label_set: str = 'synthseg',
                        by: str = 'method', order: Sequence[str] | None = None) -> Path:
    """Dice per structure (rows) for each engine (colours): a dot plot for the reports.

    Parameters
    ----------
    long : path-like or pandas.DataFrame
        Rows of the long QC table (``label_set``, ``label_name``, ``dice`` and ``by``
        columns), e.g. those of one image; rows of other label sets are ignored.
    out_png : path-like
        Output PNG file (white background).
    title : str, optional
        Title of the plot.
    label_set : str
        Which label set to plot.
    by : str
        Column whose values get one colour each (the engine).
    order : sequence of str, optional
        Order of those values in the legend and the colours (e.g. the engines of the run);
        values it lacks follow, sorted.

    Returns
    -------
    pathlib.Path
        ``out_png``. The legend gives each engine's mean Dice (over the structures present
        in the target when the table has ``target_cm3``, as ``dice_mean`` in the QC
        summary). With no usable value, a figure that says so is written.
    """
    import pandas as pd

    _setup_matplotlib()
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    df = long.copy() if isinstance(long, pd.DataFrame) else pd.read_csv(long, sep='\t')
    for col in ('label_name', 'dice', by):
        if col not in df.columns:
            raise ValueError(f'column {col!r} not in the table')
    if 'label_set' in df.columns:
        df = df[df['label_set'] == label_set]
    df = df.assign(_dice=pd.to_numeric(df['dice'], errors='coerce'))
    groups = _ordered(df[by].astype(str).unique(), order)
    structures = list(dict.fromkeys(df.sort_values('label_index')['label_name']
                                    if 'label_index' in df.columns else df['label_name']))
    height = float(np.clip(0.9 + 0.2 * len(structures), 2.5, 9.0))
    fig = Figure(figsize=(10.0, height), dpi=_DPI, facecolor='white')
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.27, 0.55 / height, 0.45, 1 - 1.0 / height))
    ax.set_title(title or f'Dice per structure ({label_set})', fontsize=10, loc='left')
    if not structures or not np.isfinite(df['_dice']).any():
        ax.set_axis_off()
        ax.text(0.5, 0.5, 'no Dice values', ha='center', va='center', transform=ax.transAxes,
                fontsize=11, color='0.4')
        return _save(fig, out_png)
    colours = colormaps['tab10']
    ypos = {name: i for i, name in enumerate(structures)}
    offsets = np.linspace(-0.25, 0.25, len(groups)) if len(groups) > 1 else [0.0]
    for k, (g, dy) in enumerate(zip(groups, offsets)):
        sub = df[df[by].astype(str) == g]
        ys = np.array([ypos[n] for n in sub['label_name']], dtype=float) + dy
        avg = sub['_dice']
        if 'target_cm3' in sub.columns:  # as the QC tables: structures present in the target
            avg = avg[pd.to_numeric(sub['target_cm3'], errors='coerce') > 0]
        mean = np.nanmean(avg) if np.isfinite(avg).any() else float('nan')
        ax.scatter(sub['_dice'], ys, s=18, color=colours(k % 10), edgecolors='none',
                   label=f'{g} (mean {mean:.2f})', zorder=3)
    ax.set_yticks(range(len(structures)))
    ax.set_yticklabels(structures, fontsize=7)
    ax.set_ylim(len(structures) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.set_xlabel('Dice', fontsize=9)
    ax.tick_params(axis='x', labelsize=8)
    ax.grid(axis='x', color='0.9', linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)
    for side in ('top', 'right'):
        ax.spines[side].set_visible(False)
    ax.legend(loc='upper left', bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return _save(fig, out_png)

"""The names in the participant-level workflow that code outside the graph relies on.

The builders of :mod:`keyprep.workflows.base` and :mod:`keyprep.workflows.registration` name
their sub-workflows and QC nodes with these functions, and the recovery of the QC tables
after a failed node (:mod:`keyprep.bids_app.qctables`) finds each registration's QC rows and
crash files with :func:`qc_sources`, from the same functions: a renamed node is renamed for
both. ``tests/test_workflows.py`` checks that every name :func:`qc_sources` gives is a node of
the built workflow.

A node's folder in the work directory is its full name with the dots as path separators
(Nipype's layout): :func:`node_dir`.

>>> participant_wf_name('sub_01'), registration_wf_name('T1w', 'antsSyN')
('sub_01_wf', 'reg_T1w_antsSyN_wf')
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..interfaces.qc import QC_LONG_FILE, QC_SUMMARY_FILE

__all__ = ['GROUPWISE_WF', 'QC_LONG_FILE', 'QC_NODE', 'QC_SUMMARY_FILE', 'TARGET_WF', 'QCSource',
           'anat_group_wf_name', 'anat_wf_name', 'group_prefixes', 'node_dir',
           'participant_wf_name', 'qc_sources', 'registration_wf_name', 'shared_prefixes',
           'variant_wf_name']

#: The target's preparation (:func:`~keyprep.workflows.base.init_target_wf`).
TARGET_WF = 'target_wf'
#: The ``--target groupwise`` template (:func:`~keyprep.workflows.base.init_groupwise_wf`).
GROUPWISE_WF = 'groupwise_wf'
#: The node writing one registration result's QC rows (``QC_LONG_FILE``, ``QC_SUMMARY_FILE``).
QC_NODE = 'qc'


def participant_wf_name(group_name: str) -> str:
    """The registrations (and, without ``--target groupwise``, everything) of one group."""
    return f'{group_name}_wf'


def anat_group_wf_name(group_name: str) -> str:
    """A group's preprocessing when it is a workflow of its own (``--target groupwise``)."""
    return f'{group_name}_anat_wf'


def anat_wf_name(image_key: str) -> str:
    """One image's preprocessing."""
    return f'anat_{image_key}_wf'


def registration_wf_name(image_key: str, method: str) -> str:
    """One engine's registration of one image."""
    return f'reg_{image_key}_{method}_wf'


def variant_wf_name(variant: str) -> str:
    """One variant's chain inside an engine's registration workflow (several variants)."""
    return f'{variant}_wf'


def node_dir(work_dir: str | Path, full_name: str) -> Path:
    """The folder of the node ``full_name`` (``keyprep_0_1_wf.sub_01_wf...qc``) in the work
    directory."""
    return Path(work_dir).joinpath(*full_name.split('.'))


@dataclass(frozen=True)
class QCSource:
    """Where one registration result's QC rows come from, and which crashes fail it."""

    method: str  #: the ``method`` column: the engine, or its variant
    qc_node: str  #: full name of the node writing the rows
    prefix: str  #: full-name prefix of the nodes that produce this result only
    engine_prefix: str  #: full-name prefix of the engine's registration workflow
    chains: tuple[str, ...]  #: prefixes of every variant's chain of that engine
    anat_prefixes: tuple[str, ...]  #: the image's preprocessing (either layout)

    def failures(self, crashes: dict[str, Path]) -> list[Path]:
        """The crash files (of ``crashes``: full node name -> crash file) that mean this
        result is missing: the image's preprocessing, the engine's own nodes outside the
        variants' chains (``register``...), then this result's chain."""
        return ([f for n, f in crashes.items() if n.startswith(self.anat_prefixes)]
                + [f for n, f in crashes.items()
                   if n.startswith(self.engine_prefix) and not n.startswith(self.chains)]
                + [f for n, f in crashes.items() if n.startswith(self.prefix)])

    def files(self, work_dir: str | Path) -> tuple[Path, Path]:
        """The long and summary QC tables this result's QC node writes."""
        folder = node_dir(work_dir, self.qc_node)
        return folder / QC_LONG_FILE, folder / QC_SUMMARY_FILE


def group_prefixes(wf_name: str, group_name: str) -> tuple[str, ...]:
    """Full-name prefixes of every node of one group (both layouts)."""
    return (f'{wf_name}.{participant_wf_name(group_name)}.',
            f'{wf_name}.{anat_group_wf_name(group_name)}.')


def shared_prefixes(wf_name: str) -> tuple[str, ...]:
    """Full-name prefixes of the nodes every registration depends on (the target)."""
    return f'{wf_name}.{TARGET_WF}.', f'{wf_name}.{GROUPWISE_WF}.'


def qc_sources(wf_name: str, group_name: str, image_key: str, methods: list[str],
               variants: dict[str, list[str]] | None = None) -> list[QCSource]:
    """The QC rows of one image's registrations: one :class:`QCSource` per engine, or per
    variant of an engine with several (``variants``: engine -> its variant names)."""
    gwf, awf = group_prefixes(wf_name, group_name)
    anat = tuple(f'{p}{anat_wf_name(image_key)}.' for p in (gwf, awf))
    out = []
    for method in methods:
        names = (variants or {}).get(method) or [method]
        engine = f'{gwf}{registration_wf_name(image_key, method)}.'
        if len(names) == 1:
            out.append(QCSource(names[0], f'{engine}{QC_NODE}', engine, engine, (engine,), anat))
            continue
        chains = tuple(f'{engine}{variant_wf_name(v)}.' for v in names)
        out += [QCSource(v, f'{chain}{QC_NODE}', chain, engine, chains, anat)
                for v, chain in zip(names, chains)]
    return out

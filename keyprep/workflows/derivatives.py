"""The files a workflow will write into the output dataset, known when it is built.

Every derivative is written by a :class:`~keyprep.interfaces.bids.DerivativesDataSink`
node, and its name depends only on the node's inputs set at build time (the source file and
entities, or an explicit relative path), except for an extension taken from the file it
receives. :func:`check_unique_derivatives` lists those names for the whole run and refuses a
workflow in which two sinks would write the same file (or the same JSON sidecar): one
output silently replacing another is a bug, found when the workflow is built instead of in
the output dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ['DuplicateDerivativeError', 'PlannedFile', 'check_unique_derivatives',
           'planned_derivatives']

#: Files the sink writes without a JSON sidecar (see DerivativesDataSink).
_NO_SIDECAR = ('.json', '.tsv', '.png', '.html')


class DuplicateDerivativeError(RuntimeError):
    """Two nodes of one run would write the same output file (an internal error)."""


@dataclass(frozen=True)
class PlannedFile:
    """One file a sink will write: ``stem`` (absolute path without extension) and
    ``extension`` (``None`` when it comes from the file the sink receives at run time)."""

    stem: str
    extension: str | None
    node: str

    @property
    def path(self) -> str:
        return self.stem + (self.extension or '.*')


def _split(name: str) -> tuple[str, str | None]:
    for ext in ('.nii.gz', '.tar.gz'):
        if name.endswith(ext):
            return name[:-len(ext)], ext
    stem, ext = os.path.splitext(name)
    return stem, ext or None


def _iter_nodes(wf, prefix: str = ''):
    """Every node of ``wf`` and of its sub-workflows, with its dotted name."""
    from nipype.pipeline.engine import Workflow

    for node in wf._graph.nodes():
        name = f'{prefix}{node.name}'
        if isinstance(node, Workflow):
            yield from _iter_nodes(node, name + '.')
        else:
            yield name, node


def planned_derivatives(wf) -> list[PlannedFile]:
    """The files (derivatives and their JSON sidecars) that the sinks of ``wf`` will write."""
    from nipype.interfaces.base import isdefined

    from ..pipeline.naming import derivative_name
    from ..interfaces.bids import DerivativesDataSink

    out = []
    for name, node in _iter_nodes(wf):
        if not isinstance(node.interface, DerivativesDataSink):
            continue
        inputs = node.inputs
        if isdefined(inputs.relative_path):
            rel = inputs.relative_path
            stem, ext = _split(rel)
        else:
            ents = dict(inputs.entities)
            ext = ents.pop('extension', None)
            stem, _ = _split(derivative_name(inputs.source_file, extension=ext or '.nii.gz',
                                             **ents))
        stem = str(Path(inputs.base_directory) / stem)
        out.append(PlannedFile(stem, ext, name))
        if inputs.sidecar and ext not in _NO_SIDECAR:
            # with the extension known only at run time, a sidecar is assumed (the strict side)
            out.append(PlannedFile(stem, '.json', name))
    return out


def check_unique_derivatives(wf) -> list[PlannedFile]:
    """Raise :class:`DuplicateDerivativeError` if two sinks of ``wf`` would write the same
    file; return the planned files otherwise.

    Two files clash when their names are equal, or when their stems are and the extension
    of one is known only at run time.
    """
    by_stem: dict[str, list[PlannedFile]] = {}
    for planned in planned_derivatives(wf):
        by_stem.setdefault(planned.stem, []).append(planned)
    clashes = []
    for files in by_stem.values():
        for i, a in enumerate(files):
            for b in files[i + 1:]:
                if a.node != b.node and (a.extension == b.extension or None in (a.extension,
                                                                                  b.extension)):
                    clashes.append((a, b))
    if clashes:
        a, b = clashes[0]
        more = f' (and {len(clashes) - 1} more clash(es))' if len(clashes) > 1 else ''
        raise DuplicateDerivativeError(
            f'two outputs of this run have the same file name: {a.path} would be written by '
            f'node {a.node} and by node {b.node}{more}; this is a bug of keyprep, please '
            'report it')
    return [f for files in by_stem.values() for f in files]

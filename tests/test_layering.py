"""keyprep's layers import only downwards: pipeline < interfaces < workflows < bids_app.

Every module under ``keyprep/`` is parsed with :mod:`ast` (imports at module level and
inside functions alike, relative ones resolved) and each import of another keyprep layer
must be of a lower one (or the same). Module paths given as strings to
``importlib.import_module`` or to the engines' ``lazy('module:function')`` count as imports.

Outside the layers: the package root (``keyprep/__init__.py``: version only;
``keyprep/__main__.py``: the command line, which may import anything), ``keyprep/data`` and
``keyprep/models`` (files, no code). A root module imported by a layer must itself import
nothing from a layer (it is below ``pipeline``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'keyprep'
LAYERS = ('pipeline', 'interfaces', 'workflows', 'bids_app')

#: Module paths that appear as strings in a lower layer without being imported there:
#: (module, string, why).
ALLOWED_STRINGS = {
    ('keyprep.pipeline.synth.handoff', 'keyprep.bids_app.train'):
        'run as a separate program (`python -m keyprep.bids_app.train`) in a subprocess '
        'on the training machine, never imported in-process',
}


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix('').parts
    if parts[-1] == '__init__':
        parts = parts[:-1]
    return '.'.join(parts)


def _layer(module: str) -> str | None:
    """The layer of a dotted keyprep module name (None: outside the layers)."""
    parts = module.split('.')
    if parts[0] != 'keyprep' or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module name) of every keyprep module ``path`` imports or names as an
    import string, anywhere in the file."""
    name = _module_name(path, root)
    package = name if path.name == '__init__.py' else name.rsplit('.', 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[:len(base) - node.level + 1]
                mod = '.'.join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ''
            out.append((node.lineno, mod))
            # ``from .. import workflows`` imports a module named in ``names``
            if _layer(mod) is None:
                out += [(node.lineno, f'{mod}.{a.name}') for a in node.names]
        elif isinstance(node, ast.Call):
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, 'id', '')
            if fname in ('import_module', 'lazy') and node.args and \
                    isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value.split(':')[0]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if text.startswith('keyprep.') and ' ' not in text and '\n' not in text:
                out.append((node.lineno, text.split(':')[0]))
    return sorted({(line, m) for line, m in out if m == 'keyprep' or m.startswith('keyprep.')})


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob('*.py')
                  if not {'data', 'models', '__pycache__'} & set(p.relative_to(PACKAGE).parts))


def upward_imports(path: Path, root: Path = PACKAGE) -> list[str]:
    """Imports of ``path`` from a layer above its own (``file:line imports module``)."""
    name = _module_name(path, root)
    own = _layer(name)
    rank = LAYERS.index(own) if own else -1  # a root module is below every layer
    if name == 'keyprep.__main__':
        return []
    bad = []
    for line, mod in imported_modules(path, root):
        layer = _layer(mod)
        if layer is None or LAYERS.index(layer) <= rank:
            continue
        if (name, mod) in ALLOWED_STRINGS:
            continue
        bad.append(f'{path.relative_to(root.parent)}:{line} imports {mod}')
    return bad


def test_every_module_is_parsed():
    """The scan sees every layer (a moved package would make the test vacuous)."""
    layers = {_layer(_module_name(p)) for p in _modules()}
    assert set(LAYERS) <= layers
    assert len(_modules()) > 50


@pytest.mark.parametrize('layer', LAYERS)
def test_no_upward_imports(layer):
    bad = [b for p in _modules() if _layer(_module_name(p)) == layer
           for b in upward_imports(p)]
    assert not bad, 'imports from a higher layer:\n' + '\n'.join(bad)


def test_root_modules_import_no_layer():
    """``keyprep/__init__.py`` (imported by every layer) sits below them all."""
    bad = [b for p in _modules() if _layer(_module_name(p)) is None for b in upward_imports(p)]
    assert not bad, '\n'.join(bad)


def test_the_scan_finds_upward_imports(tmp_path):
    """Top-level, function-level, relative and string imports upwards are all reported;
    downward imports and docstrings are not."""
    pkg = tmp_path / 'keyprep'
    (pkg / 'pipeline' / 'sub').mkdir(parents=True)
    (pkg / 'workflows').mkdir()
    (pkg / 'pipeline' / 'sub' / 'mod.py').write_text(
        'from ... import workflows\n'
        'def f():\n'
        '    from keyprep.bids_app.naming import x\n'
        '    import keyprep.interfaces.qc\n'
        "    lazy('keyprep.workflows.base:init')\n"
        "    return ['python', '-m', 'keyprep.bids_app.run']\n"
        'from ..io import make_image\n'
        '"""A docstring naming keyprep.bids_app.naming is not an import."""\n')
    (pkg / 'workflows' / 'ok.py').write_text('from ..interfaces import bids\n'
                                             'from ..pipeline import io\n')
    bad = upward_imports(pkg / 'pipeline' / 'sub' / 'mod.py', pkg)
    assert sorted(b.split(' imports ')[1] for b in bad) == sorted([
        'keyprep.workflows', 'keyprep.bids_app.naming',
        'keyprep.interfaces.qc', 'keyprep.workflows.base', 'keyprep.bids_app.run'])
    assert upward_imports(pkg / 'workflows' / 'ok.py', pkg) == []

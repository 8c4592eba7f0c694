"""Registration engines behind one interface (see :mod:`.base`).

Built-in engines live in this package; third-party engines can register through the
``keyprep.engines`` entry-point group (each entry point names a module to import).
"""

from __future__ import annotations

from .base import (
    Engine,
    EngineOptions,
    ExtraOutput,
    LearnedModel,
    RegistrationResult,
    available_engines,
    engine_variants,
    get_engine,
    learned_models,
    register_engine,
    register_model,
    resolve_methods,
    variant_owner,
)

__all__ = [
    'DEFAULT_METHODS',
    'Engine',
    'EngineOptions',
    'ExtraOutput',
    'LearnedModel',
    'RegistrationResult',
    'available_engines',
    'engine_variants',
    'get_engine',
    'learned_models',
    'register_engine',
    'register_model',
    'resolve_methods',
    'variant_owner',
]

#: Engines run when ``--methods`` is not given.
DEFAULT_METHODS = ('antsRigid', 'antsAffine', 'antsSyN')

_BUILTIN_MODULES = ('ants', 'keymorph', 'carl', 'dio')
_loaded = False


def _load_builtin_engines() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    from importlib.metadata import entry_points

    for mod in _BUILTIN_MODULES:
        importlib.import_module(f'{__name__}.{mod}')
    for ep in entry_points(group='keyprep.engines'):
        importlib.import_module(ep.value.split(':')[0])

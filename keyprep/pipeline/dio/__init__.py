"""DIO (Deep Implicit Optimization, Jena et al.): learned features, registered by a solver.

Modules: ``network`` (the multi-scale feature network, its weights file), ``solver`` (the inner
solver on feature images with the ``'ffd'``, ``'diffeo'`` and ``'affine'`` representations),
``implicit`` (gradients through the solver's optimum: exact per-voxel IFT and Jacobian-free),
``register`` (:func:`~.register.register_arrays`, the call the engine makes) and ``train``
(``keyprep train dio``). Nothing is imported here so that ``import keyprep.pipeline.dio`` stays
cheap.
"""

"""CARL: coordinate attention with refinement layers (Greer et al., ``paper_carl.md``).

Pure torch, device-agnostic: ``network`` (the coordinate-attention network Xi_theta, the
refinement U-Nets, their composition, :func:`~.network.register_arrays` used by the engine,
weights loading and checking), ``losses`` (LNCC, diffusion, GradICON) and ``train``
(``keyprep train carl``). Nothing is imported here so that ``import keyprep.pipeline.carl``
stays cheap.
"""

"""Neural network code, in floors that only look down (docs/layout.md): ``extractors/`` (frozen feature extractors)
and ``blocks/`` (the methods' building blocks) at the bottom, :mod:`networks.features` (the presets and the
pixel-aligned features: the front door to the extractors) above the extractors, ``methods/`` (the detector interface,
one file per method, the registry) above both, and :mod:`networks.graph` (a trained run as one exportable graph)
on top."""

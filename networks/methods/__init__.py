"""The detection methods: the interface (:mod:`networks.methods.detector`), one file per method, and the registry
of ``--model`` names (:mod:`networks.methods.registry`)."""

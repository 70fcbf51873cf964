"""Neural network modules of CMDR-IAD: frozen extractors, mapping MLPs, decoders, fusion."""

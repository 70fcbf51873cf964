"""Building blocks of the methods: mapping MLPs, reconstruction decoders, fusion, memory-bank pieces, dropout,
activation checkpointing. They know nothing of the extractors or the methods."""

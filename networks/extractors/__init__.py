"""The frozen feature extractors and their point operations: EfficientNet-Lite and ResNet stages, Point-MAE, FPFH,
geometry images. :mod:`networks.features` assembles them into presets and pixel-aligned feature maps."""

"""Dataset preprocessing: MVTec 3D-AD background removal and converters."""

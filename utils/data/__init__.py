"""Data: file readers and atomic writes (io), tensor transforms, the MVTec 3D-AD datasets (mvtec3d) and the
synthetic generator. Imports nothing of the other utils sub-packages."""

"""3D-only inspection of raw scans (scans_3d_only.md): the paper's polyurethane pipeline for any point-cloud files."""

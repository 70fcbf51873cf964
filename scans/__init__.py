"""3D-only inspection of raw scans (README "3D-only inspection of raw scans"): the paper's polyurethane pipeline
for any point-cloud files."""

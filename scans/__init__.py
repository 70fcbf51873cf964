"""3D-only inspection of raw scans (docs/scans.md): the paper's polyurethane pipeline
for any point-cloud files."""

"""Evaluation: the metrics (AUPRO, AUROCs), result files (metrics.json / .md / .csv), heatmap images and the HTML
report. Imports only utils.data."""

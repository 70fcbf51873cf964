"""Station: scoring parts one at a time on the line (the predictor and its thresholds). Imports utils.data and
utils.runs."""

"""Reports: metrics (accuracy, NLL, calibration), run comparison tables and figures."""

"""The C-matrix: the shareable artifact (`artifact`), its operations (`ops`), comparison
(`diff`) and estimation from a trained network (`posthoc`)."""

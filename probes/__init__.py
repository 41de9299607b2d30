"""Linear probes on model activations (scikit-learn), one module per probe."""

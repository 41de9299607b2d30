"""Analyses: one module per technique (editing transfer, causal tracing, neuron attribution,
overlap, relation). Each is a pure function: adapter + fact views + config in, result out."""

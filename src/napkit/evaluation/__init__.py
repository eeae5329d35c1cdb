"""Measuring a (pruned) model: accuracy lives in training.engine; size, FLOPs and latency here."""

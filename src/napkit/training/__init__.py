"""Training: one epoch, evaluation, and the resumable epoch loop."""

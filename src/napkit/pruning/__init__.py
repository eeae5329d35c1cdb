"""Fine-grained pruning: masks, importance criteria, global allocation, OBS compensation, the iterative loop."""

"""Torch-free foundations every stage uses: errors, atomic writes, the typed config, defaults, the metrics
reader, run directories, formatting and argument types."""

"""Benchmarks of dtn-torchrec; run each as ``python -m benchmarks.<name>`` from the repository root."""

"""Peer trainers for benchmarks/parity.py: each runs under the peers' own venv (never the project's) on fastbyol's
default workload, built from `workload.py`."""

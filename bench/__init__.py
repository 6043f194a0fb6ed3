"""Benchmarks and reliability suites for MoltenIron (`python -m bench`)."""

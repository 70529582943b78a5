"""Benchmarks of the editors: measurement helpers (`measure`) and the editor tables (`editors`)."""

"""Analyses: toxicity, flash detection, causal tracing, activation and delta strength."""

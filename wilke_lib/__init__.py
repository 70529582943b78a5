"""wilke_lib: a reproducible companion to WilKE (Wise-Layer Knowledge Editor, Hu et al. 2024)."""

__version__ = "0.1.0"

"""Triton kernels and their launchers, one module per op family. Imported on first use only."""

"""qinyu-edge: VITA-QinYu on edge GPUs."""

__version__ = "0.1.0"

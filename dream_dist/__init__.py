"""dream_dist: distributed training and evaluation of DREAM, a next-basket model."""

__version__ = "0.1.0"

"""dream_dist: a distributed trainer and evaluator for DREAM, the recurrent basket model."""

__version__ = "0.1.0"

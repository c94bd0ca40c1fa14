"""Evaluation (CLIPScore, composition sets, the benchmark), installed as ``compose.evaluation``."""

"""Evaluation, installed as ``compose.evaluation``: :mod:`~compose.evaluation.clipscore`
(CLIPScore with open_clip) and :mod:`~compose.evaluation.sets` (composition-set manifests,
the ComposLoRA sets); the benchmark over them comes next."""

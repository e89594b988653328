"""Scoring quantized models against their FP base: metrics, feature networks, paired
evaluation, error accumulation, speed, and the ``compare`` report."""

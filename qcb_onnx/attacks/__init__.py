"""Quantization-conditioned backdoor attacks, for measuring the defense against real threats."""

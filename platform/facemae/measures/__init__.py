"""Metrics as pure numpy functions of images and embeddings: fidelity of a release, retrieval leaks.

On the ground floor so that training (in-loop validation) and evaluation (whole datasets) compute the
same numbers with the same code, and neither imports the other.
"""

"""Evaluation: FR verification accuracy (utility) and real-synthetic retrieval leaks (privacy).

Plain numpy on embeddings (torch only to compute them); see DESIGN.md "Privacy metric" and "Utility metric".
"""

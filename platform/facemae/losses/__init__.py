"""Losses as pure functions of tensors and the margin heads of face recognition.

Nothing here knows about ranks or process groups: gathering embeddings across workers is the
training loop's business (STYLE.md 3).
"""

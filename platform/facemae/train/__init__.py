"""Training: per-task step functions in plain PyTorch (``steps``), called unchanged by the distributed loop.

This package's ``__init__`` imports nothing: the Ray / DeepSpeed layer lives in its own modules, and
importing ``facemae.train.steps`` must stay possible in one CPU process without them.
"""

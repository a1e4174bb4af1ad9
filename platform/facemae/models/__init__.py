"""Model math in plain PyTorch: FaceMAE (``mae``), the IResNet face-recognition backbone (``fr``) and
the named registry of their sizes (``registry``).

Kept import-free on purpose: ``facemae.config`` reads the registry's name tables to validate a
config, and that must not pull in torch or timm (seconds of import for every CLI call).
"""

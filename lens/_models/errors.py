"""Errors of model loading (the CLI reports each as one line: lens/_errors.py lists UnknownModelError)."""


class UnknownModelError(ValueError):
    """A name, folder or object the workbench cannot load as a model."""


class UnsupportedArchitectureError(UnknownModelError):
    """A model whose attention the workbench cannot capture."""

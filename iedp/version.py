"""iedp's version, in a module of its own so that code recording it (checkpoints) need not import the package."""

__version__ = "0.1.0"

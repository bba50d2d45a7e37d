"""ctxd: a contextualization broker for virtual clusters."""

__version__ = "0.1.0"

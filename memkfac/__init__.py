"""memkfac: remove memorized text from causal language models by K-FAC curvature editing."""

__version__ = "0.1.0"

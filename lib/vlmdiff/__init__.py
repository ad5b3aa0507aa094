"""vlmdiff: how a language model learns to see, by stage-wise diffing of SAE dictionaries."""

__version__ = "0.1.0"

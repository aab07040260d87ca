"""budrt: a self-hosted generative-AI serving platform."""

__version__ = "0.1.0"

"""llmctl: a git-style command line for running AI models on your own machine."""

__version__ = "0.1.0"

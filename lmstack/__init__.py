"""lmstack: LLM inference on your own GPU machines, declared in Git, applied over SSH."""

__version__ = "0.1.0"

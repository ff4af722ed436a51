"""fdivctl: LLM post-training in which the divergence is a first-class choice."""

__version__ = "0.1.0"

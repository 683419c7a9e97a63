"""CoT-Rec on Ray: LLM-powered recommendation that reasons about the people it serves."""

__version__ = "0.1.0"

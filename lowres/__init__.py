"""lowres: fine-tuning small language models on modest hardware, measured and predictable."""

__version__ = "0.1.0"

"""tinystories: from raw TinyStories text to a small Llama-style model that writes children's stories."""

__version__ = "0.1.0"

"""Adapter file formats (HuggingFace PEFT's is the only one, and the default)."""

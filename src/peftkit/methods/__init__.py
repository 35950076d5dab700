"""Built-in PEFT methods. Importing this package registers each of them (see :mod:`peftkit.config`)."""

from peftkit.methods import adapters, ia3, lora, ssf  # noqa: F401

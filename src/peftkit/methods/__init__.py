"""Built-in PEFT methods. Importing this package registers each of them (see :mod:`peftkit.config`)."""

from peftkit.methods import dora, dylora, lora, lorafa, vera  # noqa: F401

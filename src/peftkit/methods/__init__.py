"""Built-in PEFT methods. Importing this package registers each of them (see :mod:`peftkit.config`)."""

from peftkit.methods import krona, loha, lokr, lora, sora  # noqa: F401

"""Built-in PEFT methods. Importing this package registers each of them (see :mod:`peftkit.config`)."""

from peftkit.methods import adalora, krona, loha, lokr, lora, sora  # noqa: F401

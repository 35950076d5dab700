"""Built-in PEFT methods. Importing this package registers each of them (see :mod:`peftkit.config`)."""

from peftkit.methods import (
    lora,  # noqa: F401
    moe_lora,  # noqa: F401
)

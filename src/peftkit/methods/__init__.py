"""Built-in PEFT methods. Importing this package registers each of them (see :mod:`peftkit.config`)."""

from peftkit.methods import lora, p_tuning, prefix_tuning, prompt_tuning  # noqa: F401

"""Built-in PEFT methods. Importing this package registers each of them (see :mod:`peftkit.config`)."""

from peftkit.methods import lora  # noqa: F401, I001  (registration order is the `peftkit methods` order)
from peftkit.methods import bitfit, partial, diff_pruning, fish, child_tuning  # noqa: F401  (selective family)

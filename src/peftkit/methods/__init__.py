"""Built-in PEFT methods. Importing this package registers each of them (see :mod:`peftkit.config`);
the order here is the order ``peftkit methods`` lists them in."""
# ruff: noqa: I001

from peftkit.methods import lora  # noqa: F401  (first: the reference method)
from peftkit.methods import dora  # noqa: F401
from peftkit.methods import vera  # noqa: F401
from peftkit.methods import lorafa  # noqa: F401
from peftkit.methods import dylora  # noqa: F401
from peftkit.methods import adalora  # noqa: F401
from peftkit.methods import loha  # noqa: F401
from peftkit.methods import lokr  # noqa: F401
from peftkit.methods import krona  # noqa: F401
from peftkit.methods import hra  # noqa: F401
from peftkit.methods import fourierft  # noqa: F401
from peftkit.methods import vblora  # noqa: F401
from peftkit.methods import sora  # noqa: F401
from peftkit.methods import oft  # noqa: F401
from peftkit.methods import prompt_tuning  # noqa: F401
from peftkit.methods import p_tuning  # noqa: F401
from peftkit.methods import prefix_tuning  # noqa: F401
from peftkit.methods import adapters  # noqa: F401
from peftkit.methods import ia3  # noqa: F401
from peftkit.methods import ssf  # noqa: F401
from peftkit.methods import adaption_prompt  # noqa: F401
from peftkit.methods import bitfit  # noqa: F401
from peftkit.methods import ln_tuning  # noqa: F401
from peftkit.methods import trainable_tokens  # noqa: F401
from peftkit.methods import partial  # noqa: F401
from peftkit.methods import diff_pruning  # noqa: F401
from peftkit.methods import fish  # noqa: F401
from peftkit.methods import child_tuning  # noqa: F401
from peftkit.methods import shira  # noqa: F401
from peftkit.methods import quantised  # noqa: F401
from peftkit.methods import moe_lora  # noqa: F401
from peftkit.methods import poly  # noqa: F401
from peftkit.methods import compose  # noqa: F401
from peftkit.methods import gated  # noqa: F401  (UniPELT's gated sub-modules)
from peftkit.methods import hybrid  # noqa: F401  (UniPELT, MAM)
from peftkit.methods import fusion  # noqa: F401

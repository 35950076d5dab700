"""The quantisation family as named methods: QLoRA, LoftQ and QA-LoRA are LoRA (same config, file
format and tuner) on a quantised frozen base, so each registers as a variant of ``lora`` with its
own name, paper and ``peftkit train`` defaults.

* ``qlora``: LoRA on an NF4 base with double-quantised scales (Dettmers et al., "QLoRA: Efficient
  Finetuning of Quantized LLMs", 2023, arXiv:2305.14314); ``--quantize nf4`` unless given.
* ``loftq``: ``init_lora_weights="loftq"`` (Li et al., 2023, arXiv:2310.08659): the base becomes its
  NF4 quantisation and A, B start from the SVD of the quantisation residual.
* ``qalora``: ``use_qalora=True`` on an int4 base (Xu et al., 2023, arXiv:2309.14717); the adapter
  merges into the quantised zero points (``--quantize int4`` unless given).

See :mod:`peftkit.quant` for the machinery.
"""

from __future__ import annotations

from peftkit.config import MethodSpec, register_method
from peftkit.methods.lora import _TUNER, LoraConfig, _preset
from peftkit.quant.loftq import LOFTQ_PAPER
from peftkit.quant.qalora import QALORA_PAPER

QLORA_PAPER = "QLoRA: Efficient Finetuning of Quantized LLMs (Dettmers et al., 2023, arXiv:2305.14314)"

for _name, _paper, _fields, _run in (
    ("qlora", QLORA_PAPER, {}, {"quantize": "nf4"}),
    ("loftq", LOFTQ_PAPER, {"init_lora_weights": "loftq"}, {}),
    ("qalora", QALORA_PAPER, {"use_qalora": True}, {"quantize": "int4"}),
):
    register_method(MethodSpec(
        name=_name, config_cls=LoraConfig, family="quantisation", kind="wrap", mergeable=True, paper=_paper,
        tuner=_TUNER, cli_config=_preset(**_fields), variant_of="lora", run_options=_run,
    ))

"""How a ``peftkit train`` run sets up its model's padding id and class names: the one rule that the run uses when
it builds its model (:mod:`peftkit.train.run`) and that ``AutoPeftModelForSequenceClassification`` uses when it
loads a run folder (:mod:`peftkit.auto`), so that the loaded model pads and names its classes as the run did.

Paper context: none of its own; it serves every method a run trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def set_pad_token(tokenizer: Any) -> int | None:
    """Give ``tokenizer`` a padding token when it has none, as a run does: its EOS token, else its UNK token (a
    decoder such as Llama has no pad token, and its classifier reads the last non-padding token); a tokenizer that
    has a pad token keeps it.

    Args:
        tokenizer: a ``transformers`` tokenizer (changed in place when it has no pad token).

    Returns:
        the padding id, or None when the tokenizer has no pad, EOS or UNK token (then it is left unchanged).
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer.pad_token_id


def label_maps(num_labels: int | None, label_names: Sequence[Any] | None) -> dict[str, dict[Any, Any]]:
    """The ``id2label`` / ``label2id`` config entries of a classification head with ``num_labels`` classes named
    ``label_names`` (class ``i`` is ``str(label_names[i])``), as a run writes them into its model's config.

    Args:
        num_labels: the number of classes (None: no head).
        label_names: the class names in label order, or None (a regression run, or a task with unnamed classes).

    Returns:
        ``{"id2label": {0: "a", ...}, "label2id": {"a": 0, ...}}``, or ``{}`` when there are no names or their number
        is not ``num_labels`` (the config keeps transformers' ``LABEL_i``).
    """
    if not isinstance(label_names, (list, tuple)) or not label_names or len(label_names) != num_labels:
        return {}
    return {"id2label": dict(enumerate(map(str, label_names))),
            "label2id": {str(n): i for i, n in enumerate(label_names)}}

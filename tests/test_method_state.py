"""State a method keeps outside its parameters and buffers (AdaLoRA's rank masks and importance averages, robust
AdapterDrop's draw) goes into checkpoints, so that a resumed run ends as the uninterrupted one in every phase."""

from __future__ import annotations

import pytest
import torch

from peftkit import AdaLoraConfig, AdapterDropConfig, ConfigError, get_peft_model, get_peft_model_state_dict
from peftkit.train.checkpoint import latest_checkpoint
from peftkit.train.trainer import Trainer, TrainingArguments, batch_order
from tests.tiny_train import (
    Interrupted,
    StopAfter,
    TinyClassifier,
    classification_items,
    collate_classification,
)

ITEMS = classification_items(16)


def _adalora():
    torch.manual_seed(0)  # tinit=1, tfinal=5 of 12: the budget shrinks over steps 2..6, then holds
    return get_peft_model(TinyClassifier(), AdaLoraConfig(init_r=4, target_r=1, total_step=12, tinit=1, tfinal=5,
                                                          target_modules=["fc"], modules_to_save=["classifier"]))


def _adapterdrop():
    torch.manual_seed(0)
    return get_peft_model(TinyClassifier(), AdapterDropConfig(target_modules=["fc"], layers_pattern="blocks",
                                                              adapterdrop_layers=1, adapterdrop_mode="random",
                                                              reduction_factor=4, modules_to_save=["classifier"]))


def _run(model, out, data=ITEMS, save_every=2):
    return Trainer(model, data, collate_classification,
                   TrainingArguments(max_steps=12, batch_size=4, progress=False, learning_rate=5e-2, output_dir=str(out),
                                     save_every=save_every))


@pytest.mark.parametrize("make, stop", [(_adalora, 7), (_adalora, 10), (_adapterdrop, 5)])
def test_a_run_resumed_in_any_phase_ends_as_the_uninterrupted_one(tmp_path, make, stop):
    """AdaLoRA resumed in its pruning phase (step 6) restarted its importance averages; resumed in the final
    phase (step 10) it lost its masks, and every pruned triplet came back. Robust AdapterDrop resumed with the draw
    made when the model was built instead of the one made at the checkpoint's step."""
    whole = _run(make(), tmp_path / "whole", save_every=None)
    whole.train()
    reads = sum(len(b) for b, _ in zip(batch_order(len(ITEMS), 4, 0), range(stop), strict=False))
    with pytest.raises(Interrupted):
        _run(make(), tmp_path / "run", StopAfter(ITEMS, reads)).train()
    resumed = _run(make(), tmp_path / "run")
    resumed.train(resume_from_checkpoint=latest_checkpoint(tmp_path / "run"))
    a, b = get_peft_model_state_dict(whole.model), get_peft_model_state_dict(resumed.model)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    config = whole.model.peft_config["default"]
    assert getattr(config, "rank_pattern", None) == getattr(resumed.model.peft_config["default"], "rank_pattern", None)
    if make is _adalora:  # the allocation pruned something, so the masks mattered
        assert sum(map(sum, config.rank_pattern.values())) < 8


def test_adalora_checkpoints_hold_masks_and_importance_and_a_misfit_is_refused_before_any_change():
    model = _adalora()
    host = model.base_model
    assert host.method_state() == {}  # nothing yet: no gradients seen, no budget applied
    x = {k: v for k, v in collate_classification(ITEMS[:4]).items()}
    for step in (1, 2):
        model(**x).loss.backward()
        model.peft_step_end(step)
        model.zero_grad()
    state = host.method_state()
    assert sorted(state) == sorted(f"default:blocks.{i}.fc.{f}" for i in (0, 1) for f in (
        "rank_mask", *(f"{p}.importance_{s}" for p in ("lora_A", "lora_E", "lora_B") for s in ("avg", "unc"))))
    before = {k: v.clone() for k, v in state.items()}
    for bad, message in [({"default:blocks.0.fc.rank_mask": torch.ones(3, dtype=torch.bool)}, r"of shape \(3,\) does not fit"),
                         ({"default:blocks.9.fc.rank_mask": torch.ones(4, dtype=torch.bool)}, "blocks.9"),
                         ({"other:x": torch.ones(1)}, "adapter this model does not have"),
                         ({"default:blocks.0.fc.lora_A.importance_unc": None}, "holds only"),
                         ]:
        given = {k: v for k, v in {**before, "default:blocks.1.fc.rank_mask": torch.zeros(4, dtype=torch.bool),
                                   **bad}.items() if v is not None}
        with pytest.raises(ConfigError, match=message):
            host.load_method_state(given)
        after = host.method_state()
        assert all(torch.equal(after[k], before[k]) for k in before)


def test_adalora_allocation_is_refused_while_the_adapter_is_merged():
    """The masks zero lora_E entries, which changed the delta that unmerging subtracts: the base drifted."""
    model = _adalora()
    x = collate_classification(ITEMS[:4])
    model(**x).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    weight = model.get_base_model().blocks[0].fc.weight.detach().clone()
    model.merge_adapter()
    with pytest.raises(ConfigError, match=r"is merged .*unmerge it"):
        model.peft_step_end(2)
    model.unmerge_adapter()
    assert torch.allclose(model.get_base_model().blocks[0].fc.weight, weight, atol=1e-6)
    model.peft_step_end(2)  # unmerged: allowed

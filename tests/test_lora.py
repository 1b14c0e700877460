import copy

import pytest
import torch

from llama import Llama, LlamaConfig
from llama.lora import (
    TARGETS,
    adapter_state_dict,
    apply_lora,
    merge_lora,
    merged_state_dict,
)


def trained_lora_model():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny"))
    base = copy.deepcopy(model)
    apply_lora(model, rank=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return base, model, ids


def test_lora_starts_from_the_pretrained_model_and_trains_only_adapters():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, 512, (2, 20))
    before = model(ids)
    apply_lora(model, rank=4)
    assert torch.equal(model(ids), before)  # B starts at zero
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"layers.{i}.{part}.{proj}.lora_{ab}" for i in range(2) for ab in "ab"
                               for part, projs in (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:])) for proj in projs)

    base, trained, _ = trained_lora_model()
    for name, param in base.state_dict().items():
        assert torch.equal(trained.state_dict()[name], param), name  # every pretrained weight untouched
    assert all(t.abs().sum() > 0 for n, t in adapter_state_dict(trained).items() if n.endswith("lora_b"))


def test_merged_and_unmerged_models_give_the_same_logits():
    _, model, ids = trained_lora_model()
    model.eval().requires_grad_(False)
    unmerged = model(ids)
    plain = Llama(model.config).eval()
    plain.load_state_dict(merged_state_dict(model))
    assert (plain(ids) - unmerged).abs().max() <= 1e-5
    merged = merge_lora(model)
    assert not adapter_state_dict(merged)
    assert set(merged.state_dict()) == set(plain.state_dict())
    assert (merged(ids) - unmerged).abs().max() <= 1e-5


def test_bad_lora_settings():
    model = Llama(LlamaConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match=r"^LoRA rank must be >= 1, got 0$"):
        apply_lora(model, rank=0)
    with pytest.raises(ValueError, match=r"^unknown LoRA targets \['lm_head'\]; choose from q_proj, k_proj"):
        apply_lora(model, rank=2, targets=("q_proj", "lm_head"))

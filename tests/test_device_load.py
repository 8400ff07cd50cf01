"""The loader that reads a whole model straight onto a GPU (engine/device_load.py), run here on
the CPU: nothing in it depends on the device but the allocation, so the model it builds must
equal transformers' own `from_pretrained` exactly (every parameter, buffer and tie, and the
logits), in float32 and bfloat16. tests/test_gpu.py runs it on a GPU where one exists."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dscluster.engine.device_load import load_whole_on_device, materialize_parameters
from dscluster.engine.loading import load_whole, open_model
from dscluster.engine.parallel import prepare


@pytest.mark.parametrize("model, dtype", [("tiny", "float32"), ("gqa", "bfloat16")])
def test_whole_model_read_into_device_tensors_equals_from_pretrained(request, model, dtype):
    path = request.getfixturevalue(model)
    source = open_model(path, dtype, device=torch.device("cpu"))
    prepared = prepare(source, "replicated", 1)
    direct = load_whole_on_device(source, prepared.checkpoint, prepared.keys, torch.device("cpu"))
    reference = load_whole(source)   # transformers' from_pretrained
    ours, theirs = dict(direct.state_dict()), dict(reference.state_dict())
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    for (name, buf), (_, want) in zip(direct.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(buf, want), name   # non-persistent buffers (rotary inv_freq) included
    ids = torch.tensor([[1, 5, 9, 200, 17, 3]])
    with torch.no_grad():
        assert torch.equal(direct(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert not direct.training and direct.generation_config.eos_token_id == reference.generation_config.eos_token_id


def test_tied_weights_stay_one_parameter(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    source = open_model(str(tmp_path / "tied"), "float32", device=torch.device("cpu"))
    prepared = prepare(source, "replicated", 1)
    model = load_whole_on_device(source, prepared.checkpoint, prepared.keys, torch.device("cpu"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, load_whole(source).lm_head.weight)


def test_materialize_keeps_ties_and_subclass_attributes():
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    net[1].weight = net[0].weight
    net[0].weight.tag = "kept"
    materialize_parameters(net, torch.device("cpu"))
    assert net[0].weight is net[1].weight and net[0].weight.tag == "kept"
    assert all(not p.is_meta and p.device.type == "cpu" for p in net.parameters())

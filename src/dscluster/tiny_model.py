"""`dscluster tiny-model DIR`: a small random Llama and a tokenizer trained offline, so that every
path (tensor parallel, ZeRO-3, serving, batch) runs with nothing downloaded.

Shapes are chosen for DeepSpeed AutoTP, which splits in chunks of 64: 64-wide attention heads by
default, an intermediate size of 4 x hidden, and a vocabulary padded to a multiple of 256, so tp = 2
and 4 split evenly. `heads` and `kv_heads` (grouped-query attention) change only the head shapes;
`max_shard_size` writes the weights as several files with their index json, as real checkpoints are.
The defaults write exactly what they always did: other tests and benchmarks depend on them.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from dscluster.errors import UsageError

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
# Without tools, exactly the template the tiny model always had. With tools, a system block lists
# them and asks for Hermes-style calls (<tool_call>{"name": ..., "arguments": ...}</tool_call>), and
# assistant messages carrying tool_calls render them in that form, as Hermes and Qwen templates do.
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "You may call these functions:\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    "To call one, write <tool_call>{\"name\": NAME, \"arguments\": ARGUMENTS}</tool_call></s>\n{% endif %}"
    "{% for message in messages %}{% if not (tools and loop.first and message['role'] == 'system') %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] if message['content'] is not none else '' }}"
    "{% for call in message.get('tool_calls') or [] %}<tool_call>{\"name\": {{ call['function']['name'] | tojson }}, "
    "\"arguments\": {{ call['function']['arguments'] if call['function']['arguments'] is string "
    "else call['function']['arguments'] | tojson }}}</tool_call>{% endfor %}</s>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
HEAD_DIM = 64


def _train_tokenizer(vocab_size: int):
    """Byte-level BPE trained on the corpus the package ships, padded to exactly `vocab_size`
    tokens so that every id the random model can emit decodes to something."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = resources.files("dscluster.data").joinpath("corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    filler = vocab_size - tok.get_vocab_size()
    if filler > 0:
        tok.add_tokens([f"<|extra_{i}|>" for i in range(filler)])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", chat_template=CHAT_TEMPLATE,
                                   model_max_length=2048)


def write_tiny_model(directory: str | os.PathLike, seed: int = 0, layers: int = 2, hidden: int = 128,
                     vocab_size: int = 1024, max_positions: int = 2048, heads: int | None = None,
                     kv_heads: int | None = None, max_shard_size: int | None = None) -> Path:
    """Write config.json, the weights (model.safetensors, or model-0000k-of-0000n.safetensors and
    model.safetensors.index.json when `max_shard_size` bytes is exceeded) and the tokenizer into
    `directory`; deterministic per seed."""
    if heads is None:
        if hidden % HEAD_DIM:
            raise UsageError(f"--hidden {hidden} must be a multiple of {HEAD_DIM} (the attention head width), "
                             "or give --heads")
        heads = hidden // HEAD_DIM
    elif hidden % heads or (hidden // heads) % 2:
        raise UsageError(f"--hidden {hidden} must be --heads {heads} times an even head width")
    kv_heads = heads if kv_heads is None else kv_heads
    if kv_heads > heads or heads % kv_heads:
        raise UsageError(f"--kv-heads {kv_heads} must divide --heads {heads}")
    if max_shard_size is not None and max_shard_size < 1:
        raise UsageError(f"--max-shard-size {max_shard_size} must be a positive number of bytes")
    if vocab_size < 512:
        raise UsageError(f"--vocab-size {vocab_size} must be at least 512 (bytes plus merges)")
    vocab_size = -(-vocab_size // 256) * 256
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # A random model's logits are nearly flat; a larger init gives it distinct, seed-dependent
    # preferences, which makes greedy decoding a meaningful equality test.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.08)
    out.mkdir(parents=True, exist_ok=True)
    if max_shard_size is None:
        model.save_pretrained(out, safe_serialization=True)
    else:
        model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    (out / "dscluster.json").write_text(json.dumps({"written_by": "dscluster tiny-model", "seed": seed}))
    return out

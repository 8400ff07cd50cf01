"""bfloat16 judged against float32 (transformers' own model, not our code), with a tolerance a
wrong kernel fails.

bfloat16 keeps 8 significant bits, so every operation rounds by up to 2^-9 of its value. Through
the tiny Llama's two layers a correct bfloat16 run ends with logits within 2.1% of the largest
float32 logit (measured on the CPU over the prompts below and their greedy continuations; weights
rounded by truncation, or RMSNorm without its float32 upcast, stay within 2.2%). A wrong kernel is
off by the order of the logits themselves: a layer's MLP returning zeros 63%, rotary embeddings
that ignore positions 66%, a doubled attention scale 60%. The bound, 4% of the largest logit, lies
between.

Greedy tokens: where every logit is within the bound, the argmax can change only at a step whose
float32 top-two margin is within twice the bound (a near tie). So the bfloat16 engine's own greedy
generation must give float32's tokens at every step before that prompt's first near tie. It runs
the decoding path, with the key/value cache, which one forward pass does not: keys cached 1.5x too
large pass the logit bound and fail here.
"""

from __future__ import annotations

import torch

from dscluster.engine.api import GenerationRequest, SamplingParams

BOUND = 0.04       # of the largest float32 logit
FIRST_STEPS = 6    # greedy steps compared per prompt (up to its first near tie)
MIN_COMPARED = 28  # greedy steps compared in all (56 here), so that near ties cannot leave none


def prompts() -> list[tuple[int, ...]]:
    """128 prompts of 3 to 12 tokens, the same every run."""
    g = torch.Generator().manual_seed(0)
    return [(1, *torch.randint(3, 1024, (int(n),), generator=g).tolist())
            for n in torch.randint(2, 12, (128,), generator=g)]


def float32_reference(model: str) -> list[tuple[tuple[int, ...], list[int], torch.Tensor]]:
    """transformers' own model in float32 (not our code): for each prompt its first greedy tokens
    (`generate`) and the logits of prompt and tokens (one forward pass), on the CPU."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts():
            ids = torch.tensor([prompt])
            generated = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=FIRST_STEPS,
                                           min_new_tokens=FIRST_STEPS, do_sample=False, pad_token_id=0)
            out.append((prompt, generated[0, len(prompt):].tolist(), reference(generated).logits[0]))
    return out


def check_bfloat16_against_float32(bf16, model: str) -> dict:
    """Fails unless `bf16` (an engine serving `model` in bfloat16) agrees with transformers' float32
    model as the module docstring says; returns the largest logit error (as a share of the largest
    logit) and the number of greedy steps compared."""
    expected = float32_reference(model)
    params = SamplingParams(max_tokens=FIRST_STEPS, temperature=0.0, ignore_eos=True)
    got = [r.token_ids for r in bf16.generate([GenerationRequest(p, params) for p, _, _ in expected])]
    worst, compared = 0.0, 0
    for (prompt, want, reference), tokens in zip(expected, got, strict=True):
        (low,) = bf16.predict([torch.tensor([*prompt, *want])])
        assert low.dtype == torch.bfloat16, low.dtype
        scale = reference.abs().max().item()
        error = (low.float().cpu() - reference).abs().max().item() / scale
        assert error <= BOUND, f"prompt {prompt}: bfloat16 logits off by {error:.1%} of the largest logit"
        worst = max(worst, error)
        top2 = reference[len(prompt) - 1:len(prompt) - 1 + FIRST_STEPS].topk(2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
        clear = next((i for i, m in enumerate(margins) if m <= 2 * BOUND * scale), FIRST_STEPS)
        assert tokens[:clear] == want[:clear], f"prompt {prompt}: bfloat16 greedy {tokens} against float32 " \
                                               f"{want} (float32's first {clear} choices are clear)"
        compared += clear
    assert compared >= MIN_COMPARED, f"only {compared} greedy steps were clear enough to compare"
    return {"largest_error": worst, "compared_steps": compared}

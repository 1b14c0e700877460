"""Training-step throughput: our Llama against transformers' LlamaForCausalLM, same config, weights and batch.

One step is forward, cross-entropy, backward and an AdamW update: ours through `Llama.loss` (its
chunked LM-head + cross-entropy), transformers through its logits and `F.cross_entropy`. The two
models alternate in rounds inside one process (which goes first alternates too), so both see the same
machine state; the script prints each one's median tokens/s and the ratio ours / transformers.

    python benchmarks/train_step.py --preset small --batch-size 8 --seq-len 256
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llama import Llama, LlamaConfig  # noqa: E402


def reference_model(ours: Llama) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with our config and a copy of our weights."""
    import transformers

    c = ours.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings, attn_implementation="sdpa"))
    hf.load_state_dict({(k if k.startswith("lm_head") else "model." + k): v for k, v in ours.state_dict().items()},
                       strict=False)
    return hf.to(next(ours.parameters()).dtype)


def make_step(model: torch.nn.Module, loss_of):
    """One training step of `model`: loss_of() gives the mean next-token loss of the fixed batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step() -> float:
        loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="model preset (default: small)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model per round (default: 2)")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds (default: 8)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    args = parser.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    ours = Llama(LlamaConfig.from_preset(args.preset)).to(dtype).train()
    theirs = reference_model(ours).train()
    tokens = torch.randint(0, ours.config.vocab_size, (args.batch_size, args.seq_len + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    steps = {"ours": make_step(ours, lambda: ours.loss(inputs, targets)),
             "transformers": make_step(theirs, lambda: F.cross_entropy(
                 theirs(inputs).logits.flatten(0, 1).float(), targets.flatten()))}
    for step in steps.values():  # warm up allocators and kernels
        step()

    rates: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(args.rounds):
        order = list(steps.items()) if round_ % 2 == 0 else list(steps.items())[::-1]  # cancel order effects
        for name, step in order:
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.steps * inputs.numel() / (time.perf_counter() - start))

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {args.dtype}")
    print(f"model: {args.preset} ({ours.num_params() / 1e6:.1f}M params), batch {args.batch_size} x {args.seq_len}")
    medians = {name: statistics.median(r) for name, r in rates.items()}
    for name, rate in medians.items():
        print(f"{name:>13}: {rate:9.0f} tokens/s  (rounds: {', '.join(f'{r:.0f}' for r in rates[name])})")
    ratios = sorted(o / t for o, t in zip(rates["ours"], rates["transformers"]))
    print(f"ratio ours / transformers: {medians['ours'] / medians['transformers']:.3f} "
          f"(per round: median {statistics.median(ratios):.3f}, range {ratios[0]:.3f} to {ratios[-1]:.3f})")


if __name__ == "__main__":
    main()

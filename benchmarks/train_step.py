"""Training-step throughput: our Llama against transformers' LlamaForCausalLM, same config, weights and batch.

One step is forward, cross-entropy, backward and an AdamW update: ours through `Llama.loss` (its
chunked LM-head + cross-entropy), transformers through its logits and `F.cross_entropy`. The two
models alternate in rounds inside one process (which goes first alternates too), so both see the same
machine state; the script prints each one's median tokens/s and the ratio ours / transformers. On a
GPU the weights stay fp32 under bf16 autocast (as train.py does), --compile compiles both losses, and
the script prints the model FLOPs utilization (MFU) against the GPU's dense bf16 peak. Within a round
the steps are queued without reading anything back, as the Trainer runs them; the round's time ends
when its last loss is read. It ends with an error when the two losses did not fall alike over the run:
then the steps timed were not the same work.

    python benchmarks/train_step.py --preset small --batch-size 8 --seq-len 256
    python benchmarks/train_step.py --device cuda --preset 125m --batch-size 16 --seq-len 1024 --compile
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llama import Llama, LlamaConfig
from llama.trainer import peak_flops


WARMUP_STEPS = 2  # untimed steps per model before the rounds; the first one's loss starts the comparison


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


def make_step(model: torch.nn.Module, loss_of, autocast: contextlib.AbstractContextManager):
    """One training step of `model`: loss_of() gives the mean next-token loss of the fixed batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                                  fused=next(model.parameters()).is_cuda or None)

    def step() -> torch.Tensor:
        with autocast:
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="model preset (default: small)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model per round (default: 2)")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds (default: 8)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights dtype on the CPU; a GPU keeps fp32 weights under bf16 autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models' loss functions")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend (default: inductor; aot_eager checks the pipeline quickly)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if device.type == "cpu" else torch.float32
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    ours = Llama(LlamaConfig.from_preset(args.preset)).to(dtype).train()
    theirs = reference_model(ours).train().to(device)
    ours.to(device)
    tokens = torch.randint(0, ours.config.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def our_loss() -> torch.Tensor:
        return ours.loss(inputs, targets)

    def their_loss() -> torch.Tensor:
        return F.cross_entropy(theirs(inputs).logits.flatten(0, 1).float(), targets.flatten())

    compile_ = (lambda fn: torch.compile(fn, backend=args.compile_backend)) if args.compile else (lambda fn: fn)
    steps = {"ours": make_step(ours, compile_(our_loss), autocast),
             "transformers": make_step(theirs, compile_(their_loss), autocast)}
    first_loss = {}
    for name, step in steps.items():  # warm up allocators and kernels (and compile)
        first_loss[name] = step().item()
        for _ in range(WARMUP_STEPS - 1):
            step()

    rates: dict[str, list[float]] = {name: [] for name in steps}
    last_loss: dict[str, float] = {}
    for round_ in range(args.rounds):
        order = list(steps.items()) if round_ % 2 == 0 else list(steps.items())[::-1]  # cancel order effects
        for name, step in order:
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = step()
            last_loss[name] = loss.item()  # waits for the GPU to finish the round
            rates[name].append(args.steps * inputs.numel() / (time.perf_counter() - start))

    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    precision = "bf16 autocast" if device.type == "cuda" else args.dtype
    print(f"machine: {machine}, torch {torch.__version__}, {precision}{', compiled' if args.compile else ''}")
    print(f"model: {args.preset} ({ours.num_params() / 1e6:.1f}M params), batch {args.batch_size} x {args.seq_len}")
    medians = {name: statistics.median(r) for name, r in rates.items()}
    peak = peak_flops(device)
    mfu = {name: rate * ours.flops_per_token(args.seq_len) / peak if peak else None for name, rate in medians.items()}
    for name, rate in medians.items():
        shown = f"  MFU {100 * mfu[name]:.1f}%" if peak else ""
        print(f"{name:>13}: {rate:9.0f} tokens/s{shown}  (rounds: {', '.join(f'{r:.0f}' for r in rates[name])})")
    ratios = sorted(o / t for o, t in zip(rates["ours"], rates["transformers"]))
    print(f"ratio ours / transformers: {medians['ours'] / medians['transformers']:.3f} "
          f"(per round: median {statistics.median(ratios):.3f}, range {ratios[0]:.3f} to {ratios[-1]:.3f})")
    # Same weights, batch and optimizer: the loss must fall alike in both, or the timings compare different
    # computations (a compiled step whose gradients were all zeros once looked 1.11x faster).
    drop = {name: first_loss[name] - last_loss[name] for name in steps}
    print(f"loss over {WARMUP_STEPS + args.rounds * args.steps} steps: ours {first_loss['ours']:.4f} -> "
          f"{last_loss['ours']:.4f}, transformers {first_loss['transformers']:.4f} -> {last_loss['transformers']:.4f}")
    alike = abs(drop["ours"] - drop["transformers"]) <= 0.1 * abs(drop["transformers"]) + 0.02
    if args.json:
        args.json.write_text(json.dumps({
            "machine": machine, "torch": torch.__version__, "precision": precision, "compiled": args.compile,
            "preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len, "tokens_per_s": medians,
            "rounds": rates, "mfu": mfu, "ratio": medians["ours"] / medians["transformers"],
            "first_loss": first_loss, "last_loss": last_loss, "trained_alike": alike}, indent=2) + "\n")
    if not alike:
        sys.exit("error: the two models did not train alike (their losses fell by "
                 f"{drop['ours']:.4f} and {drop['transformers']:.4f}), so these timings are void")


if __name__ == "__main__":
    main()

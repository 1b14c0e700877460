"""What the side-by-side training benchmarks (dpo.py, grpo.py) share: each side runs in a child process of
its own, so that its peak resident memory is its own, and reports what it measured as one JSON line."""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys


def peak_rss_gb() -> float:
    """This process's peak resident memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def child(script: str, side: str, options: dict[str, object]) -> dict:
    """Run `script --side SIDE --option value ...` in a fresh process; return the JSON its last line prints."""
    command = [sys.executable, script, "--side", side]
    for name, value in options.items():
        command += [f"--{name}", str(value)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: the {side} side failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_rates(results: dict[str, dict], extra: dict[str, str]) -> None:
    """Each side's median steps/s, its step times and peak RSS (then `extra[side]`), and the ratios."""
    rate = {side: 1 / statistics.median(r["step_s"]) for side, r in results.items()}
    for side, r in results.items():
        print(f"{side:>5}: {rate[side]:.4f} steps/s ({', '.join(f'{t:.1f}' for t in r['step_s'])} s a step), "
              f"peak RSS {r['peak_rss_gb']:.2f} GB{extra[side]}")
    print(f"ratio ours / TRL: {rate['ours'] / rate['trl']:.2f}x steps/s, "
          f"{results['ours']['peak_rss_gb'] / results['trl']['peak_rss_gb']:.2f}x peak RSS")

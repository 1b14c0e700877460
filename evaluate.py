"""Score a model on benchmarks (PIQA, HellaSwag, ARC, WinoGrande, LAMBADA, MMLU, GSM8K) as lm-evaluation-harness does.

A thin shim over llama/cli/evaluate.py, where the command line lives (python evaluate.py --help).
"""
import sys

from llama.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())

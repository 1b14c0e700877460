"""Generate text from a model, or chat with it.

A thin shim over llama/cli/generate.py, where the command line lives (python generate.py --help).
"""
import sys

from llama.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())

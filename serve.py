"""Serve a model over an OpenAI-compatible API, with a web chat page.

A thin shim over llama/cli/serve.py, where the command line lives (python serve.py --help).
"""
import sys

from llama.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())

"""One command per article: each reproduces its setup with our model and writes its block of docs/experiments.md."""

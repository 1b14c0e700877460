"""The datasets' folder, and the code that fills it: download.py (the command, python3 data/download.py NAME) and
sources.py (where each dataset comes from), beside prepare.py. A package, so that tests and experiments import
`data.sources` from the repository's root whatever else is called `data` on sys.path; the downloaded NAME/
folders hold no code."""

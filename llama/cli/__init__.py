"""The command-line programs, importable: the scripts at the top of the repository are shims over these.

    train.py         -> llama/cli/train.py      pretraining
    finetune.py      -> llama/cli/finetune.py   SFT and classification
    generate.py      -> llama/cli/generate.py   generation, chat, classification
    data/prepare.py  -> llama/cli/prepare.py    corpus to token shards

train and finetune take a settings dataclass (`run(TrainSettings(...))`) as well as flags (`main([...])`).
"""

"""Train: `python train.py [group=option ...] [key=value ...]` (see README.md and conf/train.yaml)."""

from stm.app.cli import train_main

if __name__ == "__main__":
    train_main()

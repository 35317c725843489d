"""Evaluate a checkpoint: `python eval.py ckpt_path=path/to/checkpoint.ckpt` (see conf/eval.yaml)."""

from stm.cli import eval_main

if __name__ == "__main__":
    eval_main()

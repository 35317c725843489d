"""Evaluate a checkpoint (`python eval.py ckpt_path=path/to/checkpoint.ckpt`), or without ckpt_path the configured
model as it is (`python eval.py model=smollm2_135m memory=xl task=qa`); see conf/eval.yaml."""

from stm.app.cli import eval_main

if __name__ == "__main__":
    eval_main()

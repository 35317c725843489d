"""Console scripts `stm-train` and `stm-eval` (the same as `python train.py` / `python eval.py`)."""

from omegaconf import DictConfig

from stm.app.run import evaluate, hydra_main, train


@hydra_main("train")
def train_main(cfg: DictConfig) -> float | None:
    return train(cfg)


@hydra_main("eval")
def eval_main(cfg: DictConfig) -> None:
    evaluate(cfg)

"""Train a classifier per task: explanation -> label (consistency, label fallback) or post -> label.

python train_classifier.py data=shared data.select=[dr,dreaddit,sad]      # TF-IDF, on the gold explanations
python evaluate.py predictions=outputs.jsonl label_fallback=RUN_DIR        # label what the parser cannot read
"""

import hydra
from omegaconf import DictConfig

from mentalglm.cli import run_command, run_entry_point
from mentalglm.config import register_configs
from mentalglm.runtime.resume import register_resolvers

register_configs()
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train_classifier.yaml")
def main(cfg: DictConfig) -> None:
    from mentalglm.commands.train_classifier import train_classifier

    run_command(train_classifier, cfg)


if __name__ == "__main__":
    run_entry_point(main)

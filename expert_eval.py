"""Expert evaluation of explanations: sample and blind them, rate them in a browser, aggregate the ratings.

python expert_eval.py data=default +predictions.mentalglm_chat=preds.jsonl     # sheets/, key.csv, rubric.md
python expert_eval.py action=rate run_dir=SAMPLE_DIR rater=rater_1             # rate in a browser
python expert_eval.py action=aggregate run_dir=SAMPLE_DIR                      # means, agreement, box plots
"""

import hydra
from omegaconf import DictConfig

from mentalglm.cli import run_command, run_entry_point
from mentalglm.config import register_configs
from mentalglm.runtime.resume import register_resolvers

register_configs()
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="expert_eval.yaml")
def main(cfg: DictConfig) -> None:
    from mentalglm.commands.expert_eval import expert_eval

    run_command(expert_eval, cfg)


if __name__ == "__main__":
    run_entry_point(main)

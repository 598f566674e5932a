"""Evaluate MentalGLM: generate answers on the test sets, parse labels, write P/R/F1 (Table 4 shape).

python evaluate.py model=glm4_chat adapter=PATH
python evaluate.py model=glm4_chat run_dir=outputs/train/default/runs/DATE
python evaluate.py model=glm4_chat shots=3               # zero/few-shot baseline
python evaluate.py predictions=outputs.jsonl             # score another model's outputs
python evaluate.py report=ablation sweep_dir=PATH        # rebuild a sweep's ablation table
"""

import hydra
from omegaconf import DictConfig

from mentalglm.cli import run_entry_point
from mentalglm.config import register_configs
from mentalglm.runtime.resume import register_resolvers

register_configs()
register_resolvers()  # hydra.run.dir goes through it (resume=true continues an interrupted evaluation)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate.yaml")
def main(cfg: DictConfig) -> None:
    from mentalglm.commands.evaluate import run

    run(cfg)


if __name__ == "__main__":
    run_entry_point(main)

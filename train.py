"""Train MentalGLM: LoRA on IMHI (stage one), then C-IMHI (stage two), then the test of the best adapter.

python train.py stage=two model=glm4_chat          # stage two from the registered best stage-one adapter
python train.py variant=full model=glm4_chat       # both stages in one run
python train.py -m variant=s1,s2,full              # the ablation (Table 3) as one sweep
python train.py experiment=demo                    # tiny model on the bundled fixtures, CPU
"""

import hydra
from omegaconf import DictConfig

from mentalglm.cli import run_entry_point
from mentalglm.config import register_configs
from mentalglm.runtime.resume import register_resolvers

register_configs()
register_resolvers()  # hydra.run.dir goes through it (resume=true reuses the interrupted run's directory)


@hydra.main(version_base="1.3", config_path="conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    from mentalglm.commands.train import run

    return run(cfg)


if __name__ == "__main__":
    run_entry_point(main)

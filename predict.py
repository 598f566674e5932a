"""Label posts with a trained model: labels, explanation and parse status per post, as JSONL.

python predict.py model=glm4_chat run_dir=PATH task=sos_hl_1k text="..."      # one post
python predict.py model=glm4_chat adapter=PATH input=posts.jsonl               # task per row, or task=...
python predict.py model=glm4_chat adapter=PATH input=posts.csv text_field=post task=cp generation.backend=vllm
"""

import hydra
from omegaconf import DictConfig

from mentalglm.cli import run_command, run_entry_point
from mentalglm.config import register_configs
from mentalglm.runtime.resume import register_resolvers

register_configs()
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="predict.yaml")
def main(cfg: DictConfig) -> None:
    from mentalglm.commands.predict import predict

    run_command(predict, cfg)


if __name__ == "__main__":
    run_entry_point(main)

"""Merge an adapter into its base and save a standalone checkpoint (safetensors), checked against the adapter.

python export.py model=glm4_chat adapter=PATH output=merged/
python export.py model=glm4_chat run_dir=PATH dtype=bfloat16
"""

import hydra
from omegaconf import DictConfig

from mentalglm.cli import run_command, run_entry_point
from mentalglm.config import register_configs
from mentalglm.runtime.resume import register_resolvers

register_configs()
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="export.yaml")
def main(cfg: DictConfig) -> None:
    from mentalglm.commands.export import export

    run_command(export, cfg)


if __name__ == "__main__":
    run_entry_point(main)

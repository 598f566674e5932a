"""Build explanation-bearing instruction data with a teacher LLM (any OpenAI-compatible chat API).

python build_data.py data=default expert_examples=mine teacher=gpt4 teacher.allow_remote=true   # explain
python build_data.py action=merge run_dir=PATH                                                   # revisions in
python build_data.py action=translate data=imhi teacher=local                                   # IMHI -> zh
python build_data.py action=baseline data=default teacher=gpt4 teacher.allow_remote=true shots=3
"""

import hydra
from omegaconf import DictConfig

from mentalglm.cli import run_command, run_entry_point
from mentalglm.config import register_configs
from mentalglm.runtime.resume import register_resolvers

register_configs()
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="build_data.yaml")
def main(cfg: DictConfig) -> None:
    from mentalglm.commands.build_data import build_data

    run_command(build_data, cfg)


if __name__ == "__main__":
    run_entry_point(main)

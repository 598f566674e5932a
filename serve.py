"""Serve a trained model: an OpenAI-compatible API, /v1/classify and a demo page at /.

python serve.py model=glm4_chat adapter=PATH                          # hf backend on 127.0.0.1:8000
python serve.py model=glm4_chat adapter=PATH serve.backend=vllm       # the adapter served by vLLM
MENTALGLM_API_KEY=... python serve.py ... serve.host=0.0.0.0           # beyond loopback: a key is required
"""

import hydra
from omegaconf import DictConfig

from mentalglm.cli import run_command, run_entry_point
from mentalglm.config import register_configs
from mentalglm.runtime.resume import register_resolvers

register_configs()
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="serve.yaml")
def main(cfg: DictConfig) -> None:
    from mentalglm.commands.serve import serve

    run_command(serve, cfg)


if __name__ == "__main__":
    run_entry_point(main)

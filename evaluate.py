"""Evaluate MentalGLM: generate answers on the test sets, parse labels, write P/R/F1 (Table 4 shape).

    python evaluate.py model=glm4_chat adapter=PATH
    python evaluate.py model=glm4_chat run_dir=outputs/train/default/runs/DATE
    python evaluate.py model=glm4_chat shots=3               # zero/few-shot baseline
    python evaluate.py predictions=outputs.jsonl             # score another model's outputs
    python evaluate.py report=ablation sweep_dir=PATH        # rebuild a sweep's ablation table
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from mentalglm.resume import register_resolvers
from mentalglm.validate import group_override_error

log = logging.getLogger("evaluate")
register_resolvers()  # hydra.run.dir goes through it (resume=true continues an interrupted evaluation)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate.yaml")
def main(cfg: DictConfig) -> None:
    from mentalglm.evaluation import evaluate
    from mentalglm.pipeline import ConfigError

    try:
        evaluate(cfg)
    except (ConfigError, FileNotFoundError) as e:
        log.error("%s", e)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    if (error := group_override_error(sys.argv[1:])) is not None:
        sys.exit(f"error: {error}")
    main()

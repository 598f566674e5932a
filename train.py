"""Train MentalGLM: LoRA on IMHI (stage one), then C-IMHI (stage two), then the C-IMHI test.

    python train.py stage=two model=glm4_chat          # stage two from the best stage-one adapter
    python train.py variant=full model=glm4_chat       # both stages in one run
    python train.py -m variant=s1,s2,full              # the ablation (Table 3) as one sweep
    python train.py experiment=demo                    # tiny model on the bundled fixtures, CPU
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from mentalglm.resume import register_resolvers
from mentalglm.validate import group_override_error

log = logging.getLogger("train")
register_resolvers()  # hydra.run.dir goes through it (resume=true reuses the interrupted run's directory)


@hydra.main(version_base="1.3", config_path="conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from mentalglm.models.module import NonFiniteLossError
    from mentalglm.pipeline import ConfigError, release_memory, train
    from mentalglm.sweep import record_failure

    hc = HydraConfig.get()
    try:
        summary = train(cfg)
    except Exception as e:
        if hc.mode == RunMode.MULTIRUN:
            # One failing job must not end the sweep: record why, let the others run; the sweep exits non-zero.
            log.exception("job %s failed", hc.job.num)
            record_failure(hc.runtime.output_dir, e)
            summary = None
        elif isinstance(e, (ConfigError, FileNotFoundError, NonFiniteLossError)):
            log.error("%s", e)
            sys.exit(f"error: {e}")
        else:
            raise
    if summary is None:
        # The failed job's model and optimizer outlive its traceback in reference cycles: collect them now,
        # not during the next job. None, not nan: Optuna marks the trial failed and the search goes on
        # (a nan makes hydra-optuna-sweeper's second study.tell raise and end the whole sweep).
        release_memory()
        return None
    test = summary.get("test") or {}
    # The value an Optuna sweep optimises: the last stage's best validation score.
    return summary.get("best_val_f1_mean") if summary.get("best_val_f1_mean") is not None else test.get("f1_mean")


if __name__ == "__main__":
    if (error := group_override_error(sys.argv[1:])) is not None:
        sys.exit(f"error: {error}")
    main()

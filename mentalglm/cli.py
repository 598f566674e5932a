"""The user-error boundary every entry point runs under, and what entry points share before Hydra starts.

A mistake the user can fix (`UserError`, a config that does not compose, an unknown config group option) ends
in one `error: ...` line on stderr and exit code 2; inside a run, the traceback goes to the run's log file
only. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mentalglm.errors import OutputError, UserError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
EXIT_USER_ERROR = 2
log = logging.getLogger("mentalglm")


def one_line(error: BaseException) -> str:
    """The message of an error as one line (a composition error's cause appended)."""
    text = " ".join(str(error).split())
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        first = str(cause).strip().splitlines()[0].strip()
        if first and first not in text:
            text = f"{text}: {first}"
    return text or type(error).__name__


def fail(message: str | BaseException) -> None:
    text = one_line(message) if isinstance(message, BaseException) else message
    print(f"error: {text}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _user_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (UserError, HydraException, OmegaConfBaseException)


def run_entry_point(main: Callable[[], object], argv: Iterable[str] | None = None) -> None:
    """Run a `@hydra.main` function under the boundary (the `if __name__ == "__main__":` of every entry point)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if (error := group_override_error(argv)) is not None:
        fail(error)
    # Hydra then raises composition errors instead of printing its own multi-line report: caught below.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    from mentalglm.tracking import MaskedStream, command_line_secrets

    secrets = command_line_secrets(argv)
    stderr = sys.stderr
    if secrets:  # Hydra's own failure line repeats the overrides: a key given on the command line is masked there
        sys.stderr = MaskedStream(stderr, secrets)
    try:
        main()
    except _user_errors() as e:
        fail(e)
    except OSError as e:  # before the job: Hydra creating the run directory on a read-only or full disk
        if (error := disk_error(e)) is None:
            raise
        fail(error)
    finally:
        sys.stderr = stderr


def log_user_error(error: BaseException) -> None:
    """Inside a run: the traceback into the run's log file (not the console), the message as one log line."""
    record = logging.LogRecord(
        "mentalglm", logging.ERROR, __file__, 0, "%s", (one_line(error),), (type(error), error, error.__traceback__)
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def single_console_logging() -> None:
    """Lightning adds its own console handler when it is imported before logging is configured; under Hydra the
    root logger prints too, so every Lightning line would show twice. Route Lightning through the root."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


# ----------------------------------------------------------------------------- command line (before Hydra)
def group_override_error(argv: Iterable[str], conf_dir: Path = CONF_DIR) -> str | None:
    """The message for a `group=option` override naming a config file that does not exist, else None.

    Hydra's own report of this spans a dozen lines and ends with a hint about HYDRA_FULL_ERROR."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.lstrip("+~").split("=", 1)
        group = key.split("@", 1)[0]
        if group.startswith("hydra") or not (conf_dir / group).is_dir() or not value:
            continue
        if any(c in value for c in "([{$") or value == "null":
            continue  # sweep syntax (choice(...), range(...)) or an interpolation: Hydra's business
        options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        for option in value.split(","):
            if option not in options:
                hint = (
                    " or add conf/model/NAME.yaml (model.pretrained: a hub id or local path)"
                    if group == "model"
                    else ""
                )
                return f"unknown {group} {option!r}: choose one of {', '.join(options)}{hint}"
    return None


@contextlib.contextmanager
def job(cfg) -> Iterator[None]:
    """What every entry point's Hydra job runs inside: Lightning's console lines once, the secrets masked in the
    files Hydra saved (and the command line W&B records), the run directory held against a second process, and
    a user error's traceback into the run's log file."""
    from mentalglm.runtime.resume import claim_run_dir
    from mentalglm.tracking import config_secrets, mask_run_files

    single_console_logging()
    from hydra.core.hydra_config import HydraConfig

    output_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
    try:
        if output_dir:
            mask_run_files(output_dir, config_secrets(cfg))
        with claim_run_dir(output_dir) if output_dir else contextlib.nullcontext():
            restore_from_adapter(cfg)
            yield
    except UserError as e:
        log_user_error(e)
        raise
    except Exception as e:
        if (error := disk_error(e, output_dir)) is None:
            raise
        with contextlib.suppress(OSError):  # the log file may sit on the full disk itself
            log_user_error(error)
        raise error from None


# A full or read-only disk, said by errno or, where a library wraps it (safetensors, torch.save), by its words.
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}
DISK_WORDS = ("No space left on device", "Read-only file system", "StorageFull", "Disk quota exceeded")


def disk_error(error: BaseException, output_dir: str | None = None) -> OutputError | None:
    """The OutputError for an error that is (or was raised from) a full or read-only disk, naming the path; else
    None."""
    from mentalglm.fileio.atomic import output_error

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_ERRNOS:
            # a rename names its destination second: the file the run meant to write
            where = current.filename2 or current.filename or output_dir or "the output directory"
            return output_error(where, current)
        if words := next((w for w in DISK_WORDS if w in str(current)), None):
            return output_error(output_dir or "the output directory", OSError(words))
        current = current.__cause__ or current.__context__
    return None


def restore_from_adapter(cfg) -> None:
    """run_dir= / adapter= bring the settings their adapter was trained with (mentalglm/runtime/run_card.py)."""
    from mentalglm.runtime.run_card import RESTORED, restore_run

    if cfg.get("task_name") == "expert_eval" and cfg.get("action") != "sample":
        return  # rate / aggregate: run_dir is the folder action=sample wrote
    if cfg.get("task_name") in RESTORED and (cfg.get("adapter") or cfg.get("run_dir")):
        from mentalglm.runtime.builders import resolve_adapter

        restore_run(cfg, resolve_adapter(cfg))


def run_command(command: Callable, cfg) -> object:
    with job(cfg):
        return command(cfg)

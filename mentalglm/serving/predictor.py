"""A trained model put to use: posts in, labels and explanations out.

`Predictor` loads the base model, the adapter and the tokenizer once, renders a post of a task into the prompt
the model was trained on, and reads labels and the explanation out of what it generates. predict.py, the
`hf` backend of serve.py and the demo page all go through it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mentalglm.config import DataConfig, GenerationConfig, ModelConfig, as_config
from mentalglm.data.render import chat_ids, encode_example, plain_ids, render_prompt
from mentalglm.errors import UserError
from mentalglm.models.loading import apply_lora, load_base_model, load_tokenizer
from mentalglm.scoring.parsing import explanation_part, parse_labels
from mentalglm.tasks import Task

log = logging.getLogger(__name__)

# Shown wherever a prediction is: what the outputs are, and what they are not.
NOTICE = (
    "MentalGLM outputs are research screening aids, not diagnoses: they can be wrong and must not replace "
    "the judgement of a qualified professional."
)


class InputError(UserError):
    """A request or input row the model cannot take (empty, too long, unknown task or aspect)."""


@dataclass
class Prediction:
    task: str
    labels: list[str]
    parsed: bool
    explanation: str
    output: str
    truncated: bool = False

    def as_dict(self, task: Task) -> dict[str, Any]:
        return {
            "task": self.task,
            "labels": self.labels,
            "label_names": [task.label_display_name(lab) for lab in self.labels],
            "parsed": self.parsed,
            "explanation": self.explanation,
            "output": self.output,
            "truncated": self.truncated,
        }


def read(task: Task, output: str, truncated: bool = False) -> Prediction:
    """The labels (the task's parser) and the explanation of one generated answer."""
    parsed = parse_labels(task, output)
    return Prediction(task.name, parsed.labels, parsed.parsed, explanation_part(task, output), output, truncated)


def load_calibrations(path: str | Path | None) -> dict:
    """task -> Calibration from a test's calibration.json ({} without a file)."""
    import json

    from mentalglm.errors import ConfigError
    from mentalglm.scoring.calibration import Calibration

    if path is None:
        return {}
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return {name: Calibration(**fields) for name, fields in doc["tasks"].items()}
    except FileNotFoundError:
        raise ConfigError(f"scores.calibration_file: {path} does not exist") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"scores.calibration_file: {path} is not a calibration.json of a test ({e})") from None


def load_model(model_cfg: ModelConfig, adapter: str | None, cache_dir: str | Path):
    """The base model with the adapter, for generation only, on the GPU when there is one."""
    model = load_base_model(model_cfg, cache_dir)
    if adapter:
        model = apply_lora(model, None, adapter)
    model.config.use_cache = True
    if torch.cuda.is_available() and model_cfg.quantization is None:
        model = model.to("cuda")
    return model.eval()


class Predictor:
    def __init__(
        self,
        model_cfg: ModelConfig,
        tasks: Mapping[str, Task],
        adapter: str | None,
        *,
        cache_dir: str | Path,
        data: DataConfig,
        generation: GenerationConfig,
        load: bool = True,
        scores: bool = False,
        calibration_file: str | Path | None = None,
    ):
        self.model_cfg, self.tasks, self.adapter = as_config(ModelConfig, model_cfg), dict(tasks), adapter
        self.data, self.generation = as_config(DataConfig, data), as_config(GenerationConfig, generation)
        self.tokenizer = load_tokenizer(self.model_cfg, cache_dir)
        self.model = load_model(self.model_cfg, adapter, cache_dir) if load else None
        self.scorer = None
        self.calibrations = load_calibrations(calibration_file) if scores else {}
        if scores and self.model is not None:
            from mentalglm.runtime.likelihood import LabelScorer

            self.scorer = LabelScorer(
                self.tokenizer, self.tasks, chat=self.model_cfg.chat, system=self.model_cfg.system
            )

    # ------------------------------------------------------------------ label likelihoods
    def label_scores(self, task_names: list[str], prompts: list[list[int]]) -> list[dict | None]:
        """The `scores` block of each prompt: label probabilities from the label sentences' likelihoods, calibrated
        where a test fitted a calibration for the task; None when scores are off."""
        if self.scorer is None:
            return [None] * len(prompts)
        from mentalglm.scoring.calibration import TaskScores

        out = []
        for name, scored in zip(task_names, self.scorer(self.model, prompts, task_names)):
            task, cal = self.tasks[name], self.calibrations.get(name)
            calibrated = None
            if cal is not None:
                probs = torch.tensor([[scored.probs[lab] for lab in task.labels]], dtype=torch.float64)
                after = cal.apply(TaskScores(task, probs, torch.zeros(1, dtype=torch.long)))
                calibrated = dict(zip(task.labels, after.probs[0].tolist()))
            out.append(
                {
                    "probabilities": scored.probs,
                    "calibrated": calibrated,
                    "calibration": cal.method if cal is not None else None,
                    "likely_labels": scored.labels,
                }
            )
        return out

    # ------------------------------------------------------------------ prompts
    def task(self, name: str | None) -> Task:
        if not name:
            raise InputError(f"no task given; tasks: {', '.join(self.tasks)}")
        if name not in self.tasks:
            raise InputError(f"unknown task {name!r}; tasks: {', '.join(self.tasks)}")
        return self.tasks[name]

    def post_prompt(
        self, task: Task, text: Any, aspect: str | None = None, *, truncate: bool = True
    ) -> tuple[list[int], bool]:
        """(prompt ids, truncated) of a post of `task`. Too long: the post is cut (truncate=True, as evaluation
        does) or it is an InputError."""
        from mentalglm.data.formats import visible

        if not isinstance(text, str) or not visible(text):
            raise InputError("the post is empty")
        aspect = aspect or ""
        if task.aspects and aspect not in task.aspects:
            raise InputError(f"task {task.name} asks about one aspect: choose one of {', '.join(task.aspects)}")
        if aspect and not task.aspects:
            raise InputError(f"task {task.name} has no aspects")
        query, start, end = task.format_query(text.strip(), aspect)
        if self.data.task_description:  # as the adapter was trained (data.task_description=true)
            from mentalglm.data.fewshot import describe

            query, start, end = describe(task, query, start, end)
        record = {"id": "input", "query": query, "post_start": start, "post_end": end}
        limit = self.data.max_length
        if not truncate:
            ids = render_prompt(
                self.tokenizer,
                query,
                chat=self.model_cfg.chat,
                base_template=self.model_cfg.base_template,
                system=self.model_cfg.system,
            )
            if len(ids) > limit:
                raise InputError(f"the prompt is {len(ids)} tokens; at most {limit} (data.max_length) are allowed")
            return ids, False
        try:
            enc = encode_example(
                self.tokenizer,
                record,
                chat=self.model_cfg.chat,
                max_length=limit,
                base_template=self.model_cfg.base_template,
                system=self.model_cfg.system,
                with_answer=False,
            )
        except ValueError as e:
            raise InputError(str(e)) from None
        return enc["input_ids"], enc["truncated"]

    def messages_prompt(self, messages: list[dict]) -> list[int]:
        """Prompt ids of a chat conversation (the tokenizer's chat template; base models: the user turns)."""
        if self.model_cfg.chat and self.tokenizer.chat_template:
            return chat_ids(self.tokenizer, messages, add_generation_prompt=True)
        user = "\n".join(m["content"] for m in messages if m["role"] == "user")
        return plain_ids(self.tokenizer, self.model_cfg.base_template.replace("{query}", user))

    def text_prompt(self, prompt: str) -> list[int]:
        """Prompt ids of a plain completion prompt (the tokenizer's own prefix once)."""
        return plain_ids(self.tokenizer, prompt)

    def check_length(self, ids: list[int], limit: int, key: str) -> list[int]:
        if not ids:
            raise InputError("the prompt is empty")
        if len(ids) > limit:
            raise InputError(f"the prompt is {len(ids)} tokens; at most {limit} ({key}) are allowed")
        return ids

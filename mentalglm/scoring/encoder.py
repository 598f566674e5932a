"""A BERT-family classifier per task: `AutoModelForSequenceClassification` fine-tuned with Lightning.

One code path for the paper's two uses: explanation -> label (the consistency classifier of Appendix C, and
the label fallback of `evaluate.py`) and post -> label (the BERT rows of Table 4). Single-label tasks train
with cross-entropy and predict the argmax; multi-label and hierarchical ones (their leaves are the labels)
with binary cross-entropy, a label predicted when its sigmoid passes `threshold`. The best epoch by validation
F1 (the project's TaskMetrics, mean over a hierarchical task's two levels) is kept. `EncoderLabeler` has the
TF-IDF classifier's interface (`predict(texts) -> label lists`), so evaluation uses either kind.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from mentalglm.errors import ConfigError, first_line
from mentalglm.scoring.metrics import TaskMetrics
from mentalglm.tasks import SINGLE_LABEL_KINDS, Task

log = logging.getLogger(__name__)


def load_encoder(path: str, num_labels: int | None = None, multi_label: bool = False, trust_remote_code=False):
    """(model, tokenizer) from a hub id or directory; a missing one ends in one line naming it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    kwargs = {}
    if num_labels is not None:
        kind = "multi_label_classification" if multi_label else "single_label_classification"
        kwargs = {"num_labels": num_labels, "problem_type": kind}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as e:  # unknown hub id, no network, missing files
        raise ConfigError(f"encoder {path!r} could not be loaded: {first_line(e)}") from None
    return model, tokenizer


class EncoderLabeler:
    """One task's fine-tuned encoder, predicting label lists from texts."""

    def __init__(self, task: Task, classes: Sequence[str], model, tokenizer, max_length: int = 512, threshold=0.5):
        self.task, self.classes = task, list(classes)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length, self.threshold = int(max_length), float(threshold)

    @property
    def single_label(self) -> bool:
        return self.task.kind in SINGLE_LABEL_KINDS

    def decode(self, logits: torch.Tensor) -> list[list[str]]:
        if self.single_label:
            return [[self.classes[int(i)]] for i in logits.argmax(dim=-1).tolist()]
        chosen = (torch.sigmoid(logits.float()) > self.threshold).tolist()
        return [self.task.order_labels([c for c, on in zip(self.classes, row) if on]) for row in chosen]

    def encode(self, texts: Sequence[str]):
        """The tokenizer's padded batch of `texts`, truncated to `max_length`: for training and prediction alike."""
        return self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
        )

    @torch.inference_mode()
    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[list[str]]:
        device = next(self.model.parameters()).device
        out: list[list[str]] = []
        for start in range(0, len(texts), batch_size):
            batch = self.encode(texts[start : start + batch_size]).to(device)
            out += self.decode(self.model(**batch).logits)
        return out

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory)  # safetensors: loading it runs no code
        self.tokenizer.save_pretrained(directory)

    def to_dict(self, encoder_dir: str) -> dict:
        return {
            "classifier": "encoder",
            "task": self.task.name,
            "kind": self.task.kind,
            "language": self.task.language,
            "classes": self.classes,
            "encoder": encoder_dir,
            "max_length": self.max_length,
            "threshold": self.threshold,
        }


class EncoderClassifierModule(L.LightningModule):
    """Lightning wrapper: the Hugging Face loss (cross-entropy or BCE by problem type), Adam, validation F1."""

    def __init__(self, labeler: EncoderLabeler, lr: float, weight_decay: float = 0.0):
        super().__init__()
        self.labeler, self.model = labeler, labeler.model
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.val_metric = TaskMetrics(labeler.task, sync_on_compute=False)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch["inputs"], labels=batch["targets"]).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["gold"]))
        return loss

    def validation_step(self, batch, batch_idx):
        predicted = self.labeler.decode(self.model(**batch["inputs"]).logits)
        self.val_metric.update(predicted, batch["gold"], [True] * len(predicted), batch["aspects"])

    def on_validation_epoch_end(self):
        results = self.val_metric.compute()
        self.val_metric.reset()
        f1 = sum(m["f1"] for m in results.values()) / len(results)
        self.log("val/f1", f1, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class _Collate:
    def __init__(self, labeler: EncoderLabeler):
        self.labeler = labeler
        self.index = {c: i for i, c in enumerate(labeler.classes)}

    def __call__(self, items: list[tuple[str, list[str], str]]) -> dict:
        texts, gold, aspects = zip(*items)
        inputs = self.labeler.encode(texts)
        if self.labeler.single_label:
            targets = torch.tensor([self.index[labels[0]] for labels in gold])
        else:
            targets = torch.zeros(len(gold), len(self.index))
            for row, labels in enumerate(gold):
                for label in labels:
                    targets[row, self.index[label]] = 1.0
        return {"inputs": dict(inputs), "targets": targets, "gold": [list(g) for g in gold], "aspects": list(aspects)}


def fit_encoder(
    task: Task,
    train: Sequence[tuple[str, list[str], str]],
    val: Sequence[tuple[str, list[str], str]],
    *,
    pretrained: str,
    trainer_factory,
    checkpoint_dir: Path,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    max_length: int = 512,
    threshold: float = 0.5,
    seed: int = 42,
    trust_remote_code: bool = False,
) -> tuple[EncoderLabeler, dict]:
    """Fine-tune `pretrained` on (text, labels, aspect) items; keep the best epoch by validation F1.

    `trainer_factory(callbacks, max_epochs)` builds the Lightning Trainer (the entry point's settings).
    Returns the labeler and {"best_epoch", "best_val_f1"}.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    classes = list(task.labels)
    if task.kind in SINGLE_LABEL_KINDS and len({labels[0] for _, labels, _ in train}) < 2:
        raise ConfigError(f"task {task.name}: the classifier needs at least two labels in its training data")
    L.seed_everything(seed, workers=True, verbose=False)
    model, tokenizer = load_encoder(
        pretrained, len(classes), task.kind not in SINGLE_LABEL_KINDS, trust_remote_code=trust_remote_code
    )
    labeler = EncoderLabeler(task, classes, model, tokenizer, max_length=max_length, threshold=threshold)
    module = EncoderClassifierModule(labeler, lr=lr, weight_decay=weight_decay)
    collate = _Collate(labeler)
    train_loader = DataLoader(list(train), batch_size=batch_size, shuffle=True, collate_fn=collate)
    val_loader = DataLoader(list(val), batch_size=2 * batch_size, collate_fn=collate) if val else None
    best = None
    if val_loader is not None:
        best = ModelCheckpoint(
            dirpath=str(checkpoint_dir), monitor="val/f1", mode="max", save_top_k=1, save_weights_only=True
        )
    else:
        log.warning("task %s: no validation split, so the encoder of the last epoch is kept", task.name)
    trainer = trainer_factory([best] if best else [], epochs)
    model.train()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    info: dict = {"epochs": epochs}
    if best is not None and best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        info.update(best_val_f1=float(best.best_model_score), best_checkpoint=Path(best.best_model_path).name)
    model.eval()
    return labeler, info

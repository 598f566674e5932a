"""Every IMHI gold answer must parse, to the label its sentence states. Reads ../shared/data (never printed)."""

import csv
import os
import re
from pathlib import Path

import pytest

from mentalglm.scoring.parsing import parse_labels
from mentalglm.tasks import TASKS

pytestmark = pytest.mark.real_data

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MENTALGLM_DATA") or REPO.parent / "shared" / "data")
IMHI = DATA / "imhi"
# Folder / file stem in the IMHI release -> task name.
TASK_OF = {
    "DR": "dr",
    "dreaddit": "dreaddit",
    "SAD": "sad",
    "Irf": "irf",
    "MultiWD": "multiwd",
    "CAMS": "cams",
    "swmh": "swmh",
    "t-sid": "t_sid",
    "loneliness": "loneliness",
}


def gold_files() -> list[tuple[str, Path]]:
    files = [(p.parent.name, p) for p in sorted((IMHI / "train_data" / "instruction_data").glob("*/*.csv"))]
    files += [(p.stem, p) for p in sorted((IMHI / "expert_examples").glob("*.csv"))]
    return files


if not IMHI.is_dir():
    pytest.skip(f"shared data not found at {DATA}", allow_module_level=True)


@pytest.mark.parametrize(
    "dataset, path", gold_files(), ids=lambda x: x if isinstance(x, str) else f"{x.parent.name}/{x.name}"
)
def test_gold_answers_parse_to_their_label(dataset, path):
    task = TASKS[TASK_OF[dataset]]
    # The label a gold answer states, read off the exact label sentence (independent of the parser).
    sentence_label = {sentence.lower(): label for label, sentence in task.label_sentences.items()}
    n, wrong = 0, []
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.DictReader(f), 2):
            answer = row["gpt-3.5-turbo"]
            sentence = re.split(r"reasoning:", answer, maxsplit=1, flags=re.IGNORECASE)[0].strip().lower()
            expected = sentence_label.get(sentence)
            result = parse_labels(task, answer)
            n += 1
            if expected is None or not result.parsed or result.labels != [expected]:
                # Only the label sentence goes into the report, never the post or the explanation.
                wrong.append((lineno, sentence[:80], result.labels))
    assert n > 0
    assert not wrong, f"{len(wrong)}/{n} gold answers misparsed in {path.name}, first: {wrong[:3]}"

"""Multiple-choice benchmarks in the MMLU, C-Eval and CMMLU file layouts, scored by the answer letter's likelihood.

Layouts (a task folder holds a `dev` folder for few-shot examples and a folder of scored questions):
- mmlu:  dev/<subject>_dev.csv and test/<subject>_test.csv, no header: question,A,B,C,D,answer
- ceval: dev/<subject>_dev.csv and val/<subject>_val.csv, header id,question,A,B,C,D,answer[,explanation]
- cmmlu: dev/<subject>.csv and test/<subject>.csv, header ,Question,A,B,C,D,Answer
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.data.types import Message
from tuneforge.errors import DataError

BUILTIN = Path(__file__).parent / "benchmarks"
LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Question:
    """One question with its options and the correct letter."""

    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: str
    origin: str


def task_folder(task: str, task_dir: str | None) -> Path:
    """A built-in demo task (mmlu_demo, ceval_demo, cmmlu_demo) or TASK_DIR/TASK."""
    folder = Path(task_dir) / task if task_dir else BUILTIN / task
    if not folder.is_dir():
        known = ", ".join(sorted(p.name for p in BUILTIN.iterdir()))
        raise DataError(f"benchmark folder {folder} not found; built-in tasks: {known}; for your own copy of "
                        "MMLU/C-Eval/CMMLU set eval.task_dir to the folder holding it and eval.task to its name")
    return folder


def load_task(folder: Path) -> tuple[list[Question], dict[str, list[Question]]]:
    """(scored questions, few-shot examples by subject), detecting the layout from the file names."""
    dev = folder / "dev"
    if not dev.is_dir():
        raise DataError(f"{folder}: no dev/ folder (few-shot examples); see the layouts in the README")
    scored_dir = next((folder / d for d in ("test", "val") if (folder / d).is_dir()), None)
    if (folder / "val").is_dir() and any(p.name.endswith("_dev.csv") for p in dev.iterdir()):
        scored_dir = folder / "val"  # C-Eval's test answers are hidden; its val split is the scored one
    if scored_dir is None:
        raise DataError(f"{folder}: no test/ or val/ folder of questions")
    shots: dict[str, list[Question]] = {}
    for path in sorted(dev.glob("*.csv")):
        subject = _subject(path)
        shots[subject] = read_questions(path, subject)
    questions = [q for path in sorted(scored_dir.glob("*.csv")) for q in read_questions(path, _subject(path))]
    if not questions:
        raise DataError(f"{scored_dir}: no questions found")
    return questions, shots


def _subject(path: Path) -> str:
    return path.stem.removesuffix("_dev").removesuffix("_test").removesuffix("_val")


def read_questions(path: Path, subject: str) -> list[Question]:
    """Rows of one CSV file in any of the three layouts."""
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline="")))
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if "question" in header and "answer" in header:
        index = {name: header.index(name) for name in ("question", "a", "b", "c", "d", "answer")}
        body = rows[1:]
        start = 2
    else:  # MMLU: no header
        index = {"question": 0, "a": 1, "b": 2, "c": 3, "d": 4, "answer": 5}
        body = rows
        start = 1
    out = []
    for number, row in enumerate(body, start=start):
        try:
            answer = row[index["answer"]].strip().upper()
            options = tuple(row[index[k]] for k in "abcd")
            question = row[index["question"]]
        except IndexError:
            raise DataError(f"{path}: line {number}: expected question, A, B, C, D and answer columns") from None
        if answer not in LETTERS:
            raise DataError(f"{path}: line {number}: answer {answer!r} is not one of A, B, C, D")
        out.append(Question(subject, question, options, answer, f"{path.name}: line {number}"))  # type: ignore[arg-type]
    return out


def format_question(q: Question, lang: str) -> str:
    """The question with lettered options, ending where the answer letter goes."""
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, q.options))
    return f"{q.question}\n{options}\n{'答案：' if lang == 'zh' else 'Answer:'}"


def build_prompt(q: Question, shots: list[Question], n_shot: int, lang: str) -> tuple[list[Message], str]:
    """(turns: n solved examples then the question, system instruction)."""
    system = (f"以下是关于{q.subject}的单项选择题，请直接给出正确答案的选项字母。" if lang == "zh" else
              f"The following are multiple choice questions about {q.subject.replace('_', ' ')}. "
              "Answer with the letter of the correct option.")
    turns: list[Message] = []
    for example in shots[:n_shot]:
        turns += [Message("user", format_question(example, lang)), Message("assistant", example.answer)]
    return turns + [Message("user", format_question(q, lang))], system


def letter_ids(tokenizer: object) -> list[int]:
    """The first token id of each answer letter."""
    return [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in LETTERS]  # type: ignore[attr-defined]


def score_question(model: object, prompt_ids: list[int], letters: list[int]) -> list[float]:
    """Log-probabilities of A/B/C/D as the next token after the prompt."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].float()  # type: ignore[operator]
    return torch.log_softmax(logits, dim=-1)[letters].tolist()

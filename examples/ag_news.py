"""AG News, a worked example on real text: LS++ teachers, their C-matrix, and students by proxy, KD and plain.

    python examples/ag_news.py [--seeds 0 1 2] [--out runs/ag_news] [--results-dir benchmarks/results]

Everything runs offline on a CPU, under an unmodified `transformers.Trainer` with the wrappers of
`kd.integrations.transformers` (the `text` extra: `pip install '.[text]'`):

1. **Data.** The 7,600 items of AG News' test split in ../shared/data/ag_news (4 classes, 1,900
   each; text = title + " " + description), split once, stratified, with split seed 0: 6,080 items
   to train on and 1,520 held out, the same for every seed (the seed changes initialisation,
   dropout and data order only). A word-level tokenizer is trained on the training part alone with
   the `tokenizers` library (no pretrained vocabulary can be downloaded here).
2. **Teachers.** A small BERT trained from scratch (`BertConfig`: 2 layers, hidden 128), with
   1-hot targets (the plain model) and with LS++ (`LSPPForSequenceClassification` and the
   `CMatrixExport` callback, which writes its cmatrix.safetensors).
3. **The C-matrix.** `kd cmatrix show` on the seed-0 LS++ teacher's file (the text goes into the
   results) and `kd cmatrix plot` into docs/images/ag_news_cmatrix.png.
4. **Students.** A smaller BERT (1 layer, hidden 64) from the seed's LS++ teacher: by proxy
   (`ProxyForSequenceClassification`, from its cmatrix.safetensors alone), by KD
   (`KDForSequenceClassification`, the teacher network live), and plain (1-hot).
5. **A reference.** TF-IDF on word 1-2-grams with scikit-learn's logistic regression, on the same
   split (deterministic, one number).

Metrics are the last epoch's (no best-epoch selection) on the 1,520 held-out items: top-1, NLL,
ECE and mean confidence (`kd.reports.metrics.classification_metrics` on the logits), and the
training time without the per-epoch evaluations. Every run has its folder under --out (ignored by
git); one with a metrics.json is finished and is not trained again, so the table can be completed
over sittings. The results (RESULTS/ag_news.json and .md) are rewritten after every run.

`--short` is the test's mode: 200 items, tiny models, 3 steps per run; its results, C-matrix text and
figure go into --out unless --results-dir and --figure are given.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import html
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _seeds import markdown_table, table_metrics  # noqa: E402

from kd.io import write_json_atomic, write_text_atomic  # noqa: E402
from kd.reports.metrics import classification_metrics  # noqa: E402

try:
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast, Trainer, TrainingArguments

    from kd.integrations.transformers import (
        CMatrixExport,
        KDForSequenceClassification,
        LSPPForSequenceClassification,
        ProxyForSequenceClassification,
    )
except ImportError as exc:
    raise SystemExit(f"examples/ag_news.py needs the 'text' extra: pip install '.[text]' ({exc})") from None

DATA = ROOT.parent / "shared" / "data" / "ag_news"
KD = str(Path(sys.executable).with_name("kd"))  # the console script installed beside this Python
SPLIT_SEED = 0
HELD_OUT = 0.2
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


@dataclasses.dataclass(frozen=True)
class Size:
    """A BERT's shape: layers, hidden width, attention heads, feed-forward width."""

    layers: int
    hidden: int
    heads: int
    intermediate: int

    @property
    def name(self) -> str:
        return f"bert-{self.layers}x{self.hidden}-scratch"

    def describe(self) -> str:
        layers = f"{self.layers} layer{'s' if self.layers > 1 else ''}"
        return f"{self.name} ({layers}, hidden {self.hidden}, {self.heads} heads, feed-forward {self.intermediate})"


@dataclasses.dataclass(frozen=True)
class Recipe:
    items: int | None  # None: all 7,600
    vocab: int
    max_length: int
    teacher: Size
    student: Size
    teacher_epochs: int
    student_epochs: int
    batch: int
    lr: float
    weight_decay: float
    warmup: float  # a fraction of the steps
    max_steps: int  # -1: the epochs decide


FULL = Recipe(items=None, vocab=12000, max_length=64, teacher=Size(2, 128, 4, 256), student=Size(1, 64, 2, 128),
              teacher_epochs=5, student_epochs=5, batch=32, lr=1e-3, weight_decay=0.01, warmup=0.1, max_steps=-1)
SHORT = Recipe(items=200, vocab=400, max_length=32, teacher=Size(1, 32, 2, 64), student=Size(1, 16, 2, 32),
               teacher_epochs=1, student_epochs=1, batch=16, lr=1e-3, weight_decay=0.01, warmup=0.0, max_steps=3)

ROWS = {  # run folder stem -> the table's row
    "tfidf": "reference: TF-IDF 1-2-grams + logistic regression",
    "teacher-onehot": "teacher {t}, 1-hot",
    "teacher-lspp": "teacher {t}, LS++",
    "student-proxy": "student {s}: proxy (the LS++ teacher's C-matrix)",
    "student-kd": "student {s}: KD (the LS++ teacher, live)",
    "student-plain": "student {s}: plain 1-hot",
}


# ----------------------------------------------------------------------------- data and tokenizer


def clean(text: str) -> str:
    """AG News' escapes undone: `#36;` is `$`, `#39;` an apostrophe (HTML entities without their `&`),
    a backslash a line break."""
    text = re.sub(r"&?#(\d+);", lambda m: html.unescape(f"&#{m.group(1)};"), text)
    return " ".join(text.replace("\\", " ").split())


def read_ag_news(folder: Path) -> tuple[list[str], list[int], list[str]]:
    """(texts, labels 0-3, class names) of test.csv (class index 1-4, title, description) and classes.txt."""
    class_names = [line.strip() for line in (folder / "classes.txt").read_text().splitlines() if line.strip()]
    texts, labels = [], []
    with open(folder / "test.csv", newline="", encoding="utf-8") as f:
        for index, title, description in csv.reader(f):
            texts.append(clean(f"{title} {description}"))
            labels.append(int(index) - 1)
    return texts, labels, class_names


def split(labels: list[int], items: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out indices: stratified, split seed 0 (the same for every training seed); with
    `items`, a stratified subset of that many first."""
    from sklearn.model_selection import train_test_split

    indices, y = np.arange(len(labels)), np.asarray(labels)
    if items is not None:
        indices = train_test_split(indices, train_size=items, stratify=y, random_state=SPLIT_SEED)[0]
    return train_test_split(indices, test_size=HELD_OUT, stratify=y[indices], random_state=SPLIT_SEED)


def train_tokenizer(texts: list[str], vocab: int, max_length: int) -> PreTrainedTokenizerFast:
    """An uncased word-level tokenizer ([CLS] text [SEP]) trained on `texts`, as a Hugging Face fast tokenizer.

    Its vocabulary is the `vocab` most frequent words and punctuation marks (BERT's normalizer and
    pre-tokenizer), the others are [UNK]. Word level because its training is deterministic (by
    count, ties by the word): the `tokenizers` WordPiece trainer (0.23) gave another vocabulary on
    each of three runs on the same texts, so a fresh clone would get other numbers.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab, special_tokens=SPECIAL))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_max_length=max_length)


class Task:
    """The split, its tokenizer (trained once and kept in OUT/tokenizer, so later sittings use the same
    vocabulary) and the tokenized rows."""

    def __init__(self, data: Path, recipe: Recipe, out: Path) -> None:
        texts, labels, self.class_names = read_ag_news(data)
        if len(self.class_names) != 4 or sorted(set(labels)) != [0, 1, 2, 3]:
            raise SystemExit(f"{data}: expected AG News' 4 classes (classes.txt and class indices 1-4)")
        train, held_out = split(labels, recipe.items)
        self.texts = {"train": [texts[i] for i in train], "test": [texts[i] for i in held_out]}
        self.labels = {"train": [labels[i] for i in train], "test": [labels[i] for i in held_out]}
        folder = out / "tokenizer"
        if (folder / "tokenizer.json").exists():
            self.tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        else:
            self.tokenizer = train_tokenizer(self.texts["train"], recipe.vocab, recipe.max_length)
            self.tokenizer.save_pretrained(folder)
        self.rows = {
            part: [{**self.tokenizer(text, truncation=True), "label": label}
                   for text, label in zip(self.texts[part], self.labels[part])]
            for part in ("train", "test")
        }
        self.id2label = dict(enumerate(self.class_names))

    def describe(self) -> dict:
        lengths = [len(row["input_ids"]) for row in self.rows["train"]]
        return {"train_items": len(self.rows["train"]), "held_out_items": len(self.rows["test"]),
                "per_class_held_out": [self.labels["test"].count(k) for k in range(4)],
                "vocab": len(self.tokenizer), "truncated_train_items": sum(n >= self.tokenizer.model_max_length for n in lengths),
                "median_train_tokens": float(np.median(lengths))}


# ----------------------------------------------------------------------------- models and runs


def bert(task: Task, size: Size, recipe: Recipe, seed: int) -> BertForSequenceClassification:
    """A randomly initialised BERT of `size` (seeded), whose id2label names AG News' classes."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(task.tokenizer), hidden_size=size.hidden, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, intermediate_size=size.intermediate, max_position_embeddings=recipe.max_length,
        num_labels=4, id2label=task.id2label, label2id={name: i for i, name in task.id2label.items()},
    )
    return BertForSequenceClassification(config)


def accuracy(prediction) -> dict[str, float]:  # noqa: ANN001 - an EvalPrediction
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def train(task: Task, recipe: Recipe, model: torch.nn.Module, out: Path, seed: int, epochs: int,
          callbacks: list | None = None) -> dict:
    """Train `model` (a plain classifier or a wrapper) with an unmodified Trainer; its metrics.json.

    Evaluates on the held-out part at every epoch end (a learning curve in history.json; nothing
    is selected by it) and takes the metrics from the last epoch's logits.
    """
    steps = recipe.max_steps if recipe.max_steps > 0 else epochs * -(-len(task.rows["train"]) // recipe.batch)
    args = TrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, max_steps=recipe.max_steps, per_device_train_batch_size=recipe.batch,
        per_device_eval_batch_size=256, learning_rate=recipe.lr, weight_decay=recipe.weight_decay,
        warmup_steps=int(recipe.warmup * steps), lr_scheduler_type="linear", eval_strategy="epoch",
        logging_strategy="epoch", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=task.rows["train"], eval_dataset=task.rows["test"],
                      processing_class=task.tokenizer, compute_metrics=accuracy, callbacks=callbacks or [])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    history = trainer.state.log_history
    evaluating = sum(entry.get("eval_runtime", 0.0) for entry in history)
    prediction = trainer.predict(task.rows["test"])
    metrics = classification_metrics(torch.from_numpy(prediction.predictions), torch.from_numpy(prediction.label_ids))
    result = {f"test_{key}": value for key, value in metrics.items()}
    result.update(train_seconds=wall - evaluating, eval_seconds=evaluating, steps=trainer.state.global_step, seed=seed,
                  parameters=sum(p.numel() for p in model.parameters()))
    write_json_atomic(out / "history.json", history)
    return result


def finished(out: Path) -> dict | None:
    return json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else None


def run_teacher(task: Task, recipe: Recipe, out: Path, seed: int, method: str) -> dict:
    model = bert(task, recipe.teacher, recipe, seed)
    if method == "lspp":
        wrapper = LSPPForSequenceClassification(model, alpha=0.1)
        metrics = train(task, recipe, wrapper, out, seed, recipe.teacher_epochs,
                        [CMatrixExport(dataset="ag_news", model_name=recipe.teacher.name)])  # OUT/cmatrix.safetensors
        wrapper.save_pretrained(out / "final")  # the plain BERT, and its cmatrix.safetensors beside it
    else:
        metrics = train(task, recipe, model, out, seed, recipe.teacher_epochs)
        model.save_pretrained(out / "final")
    return metrics


def run_student(task: Task, recipe: Recipe, out: Path, seed: int, mode: str, teacher: Path) -> dict:
    model = bert(task, recipe.student, recipe, seed)
    if mode == "proxy":
        model = ProxyForSequenceClassification(model, teacher / "cmatrix.safetensors")  # no teacher network
    elif mode == "kd":
        model = KDForSequenceClassification(model, BertForSequenceClassification.from_pretrained(teacher / "final"))
    return train(task, recipe, model, out, seed, recipe.student_epochs)


def tfidf_reference(task: Task) -> dict:
    """TF-IDF on word 1-2-grams (sublinear tf, fitted on the training part) and logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True)
    features = vectorizer.fit_transform(task.texts["train"])
    classifier = LogisticRegression(C=10.0, max_iter=2000).fit(features, task.labels["train"])
    seconds = time.perf_counter() - start
    logits = torch.from_numpy(classifier.predict_log_proba(vectorizer.transform(task.texts["test"])))
    metrics = classification_metrics(logits, torch.tensor(task.labels["test"]))
    return {**{f"test_{key}": value for key, value in metrics.items()}, "train_seconds": seconds,
            "features": len(vectorizer.vocabulary_)}


# ----------------------------------------------------------------------------- the C-matrix and the report


def kd_command(*args: str) -> str:
    """`kd ARGS` as a user runs it (the console script beside this Python, else `kd` on the PATH); its output."""
    script = KD if Path(KD).exists() else "kd"
    result = subprocess.run([script, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"kd {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result.stdout


class Report:
    def __init__(self, args: argparse.Namespace, recipe: Recipe, task: Task, command: str) -> None:
        self.args, self.recipe, self.task, self.command = args, recipe, task, command
        names = {"t": recipe.teacher.name, "s": recipe.student.name}
        self.rows: dict[str, list[dict]] = {stem: [] for stem in ROWS}
        self.titles = {stem: title.format(**names) for stem, title in ROWS.items()}
        self.cmatrix_text, self.cmatrix_seed = "", None

    def add(self, stem: str, metrics: dict) -> None:
        self.rows[stem].append({"seed": metrics.get("seed"), **table_metrics(metrics)})
        self.write()

    def write(self) -> None:
        recipe, described = self.recipe, self.task.describe()
        sha = hashlib.sha256((self.args.data_dir / "test.csv").read_bytes()).hexdigest()
        lines = [
            "# AG News: LS++ teachers and their students, small BERTs trained from scratch on a CPU", "",
            f"Command: `{self.command}`", "",
            f"AG News' test split (7,600 items, sha256 of test.csv {sha[:12]}...) split once, stratified (split seed "
            f"{SPLIT_SEED}): {described['train_items']:,} items to train on, {described['held_out_items']:,} held out "
            f"({', '.join(map(str, described['per_class_held_out']))} per class), the same for every seed. "
            f"A word-level tokenizer ({described['vocab']:,} tokens) trained on the training part; at most "
            f"{recipe.max_length} tokens per item. Teacher {recipe.teacher.describe()}, {recipe.teacher_epochs} epochs; "
            f"student {recipe.student.describe()}, {recipe.student_epochs} epochs; all under `transformers.Trainer` "
            f"(AdamW, lr {recipe.lr:g}, linear decay after "
            f"{recipe.warmup:.0%} warm-up, batch {recipe.batch}, weight decay {recipe.weight_decay:g}, alpha 0.1); the students "
            "learn from the same seed's LS++ teacher. Last-epoch metrics on the held-out items; train seconds "
            "on one CPU thread, without the per-epoch evaluations (min / median over seeds).", "",
            *markdown_table({self.titles[stem]: runs for stem, runs in self.rows.items()}, "run"),
        ]
        if self.cmatrix_text:
            lines += ["", f"`kd cmatrix show` of the seed-{self.cmatrix_seed} LS++ teacher's C-matrix:", "", "```",
                      self.cmatrix_text.rstrip(), "```"]
        results = self.args.results_dir
        results.mkdir(parents=True, exist_ok=True)
        write_text_atomic(results / "ag_news.md", "\n".join(lines) + "\n")
        write_json_atomic(results / "ag_news.json", {
            "command": self.command, "data_sha256": sha, "split_seed": SPLIT_SEED, "held_out_fraction": HELD_OUT,
            "task": described, "recipe": dataclasses.asdict(recipe), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "titles": self.titles, "rows": self.rows, "cmatrix_show": self.cmatrix_text,
            "cmatrix_seed": self.cmatrix_seed,
        })


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--out", type=Path, default=None, help="run folders (default runs/ag_news, --short runs/ag_news-short)")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="where ag_news.json and .md go (default benchmarks/results, --short: --out)")
    parser.add_argument("--figure", type=Path, default=None,
                        help="the C-matrix heatmap (default docs/images/ag_news_cmatrix.png, --short: OUT/ag_news_cmatrix.png)")
    parser.add_argument("--data-dir", type=Path, default=DATA, help="AG News' test.csv and classes.txt")
    parser.add_argument("--short", action="store_true", help="200 items, tiny models, 3 steps a run (the test's mode)")
    args = parser.parse_args(argv)
    # One thread: models this small gain little from a second one, a busy CPU makes two threads
    # many times slower (they spin waiting for each other), and one thread gives the same numbers
    # on every machine.
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    recipe = SHORT if args.short else FULL
    args.out = args.out or ROOT / "runs" / ("ag_news-short" if args.short else "ag_news")
    args.results_dir = args.results_dir or (args.out if args.short else ROOT / "benchmarks" / "results")
    figure = args.out if args.short else ROOT / "docs" / "images"
    args.figure = args.figure or figure / "ag_news_cmatrix.png"
    command = " ".join(["python examples/ag_news.py", *(argv if argv is not None else sys.argv[1:])])

    args.out.mkdir(parents=True, exist_ok=True)
    recorded = args.out / "recipe.json"
    if recorded.exists() and json.loads(recorded.read_text()) != dataclasses.asdict(recipe):
        raise SystemExit(f"{args.out} holds runs of another recipe (its recipe.json); give another --out")
    write_json_atomic(recorded, dataclasses.asdict(recipe))
    task = Task(args.data_dir, recipe, args.out)
    print(f"AG News: {task.describe()}", flush=True)
    report = Report(args, recipe, task, command)

    def step(stem: str, seed: int | None, work) -> dict | None:  # noqa: ANN001 - a callable
        """The run's metrics: a finished run's, else trained now if its seed is asked for (else None)."""
        out = args.out / (stem if seed is None else f"{stem}-s{seed}")
        metrics = finished(out)
        if metrics is None and seed is not None and seed not in args.seeds:
            return None
        if metrics is None:
            print(f"training {out.name} ...", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            metrics = work(out)
            write_json_atomic(out / "metrics.json", metrics)
        print(f"{out.name}: top-1 {metrics['test_top1']:.4f}, NLL {metrics['test_nll']:.3f}, "
              f"ECE {metrics['test_ece']:.3f}, {metrics['train_seconds']:.0f} s", flush=True)
        report.add(stem, metrics)
        return metrics

    step("tfidf", None, lambda out: tfidf_reference(task))
    done = {int(path.parent.name.rpartition("-s")[2]) for path in args.out.glob("teacher-lspp-s*/metrics.json")}
    seeds = sorted(set(args.seeds) | done)  # train the seeds asked for; show every finished one
    for seed in seeds:
        step("teacher-onehot", seed, lambda out: run_teacher(task, recipe, out, seed, "onehot"))
        teacher = args.out / f"teacher-lspp-s{seed}"
        trained = finished(teacher) is None
        if step("teacher-lspp", seed, lambda out: run_teacher(task, recipe, out, seed, "lspp")) is None:
            continue  # no students without their teacher
        if seed == seeds[0]:  # the neighbours it learned, and its heatmap
            report.cmatrix_seed = seed
            report.cmatrix_text = kd_command("cmatrix", "show", str(teacher / "cmatrix.safetensors"))
            print(report.cmatrix_text, flush=True)
            if trained or not args.figure.exists():
                args.figure.parent.mkdir(parents=True, exist_ok=True)
                kd_command("cmatrix", "plot", str(teacher / "cmatrix.safetensors"), "--out", str(args.figure), "--overwrite",
                           "--title", f"LS++ C-matrix, AG News ({recipe.teacher.name}, seed {seed})")
            report.write()
        for mode in ("proxy", "kd", "plain"):
            step(f"student-{mode}", seed, lambda out: run_student(task, recipe, out, seed, mode, teacher))
    print(f"wrote {args.results_dir / 'ag_news.md'} and .json", flush=True)


if __name__ == "__main__":
    main()

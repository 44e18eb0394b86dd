"""The tiny text task of tests/test_transformers.py, and its worker under torchrun.

    torchrun --nproc_per_node 2 tests/hf_ddp_worker.py OUT_DIR

Everything is built offline: synthetic news-like sentences in four topics, a word-level
tokenizer trained on them with the `tokenizers` library (wrapped as `PreTrainedTokenizerFast`),
and a randomly initialised two-layer BERT from a `BertConfig` whose `id2label` names the topics.

As a worker it trains `LSPPForSequenceClassification` with an unmodified `Trainer` on the CPU
(gloo) twice: `sync`, as a user would, and `nosync`, the control, with DDP told to ignore the C
logits (so their gradients are not all-reduced). Each rank writes
OUT_DIR/{mode}-rank{r}.safetensors (its C logits and classifier weights); `sync` also writes
its cmatrix.safetensors through `CMatrixExport` in OUT_DIR/sync.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast, Trainer, TrainingArguments

LABELS = ("World", "Sports", "Business", "Sci/Tech")
TOPIC_WORDS = (
    "government minister election president war treaty border capital parliament embassy",
    "match team coach season goal league player score cup championship",
    "market stocks profit company shares investors bank revenue economy merger",
    "software internet computer space research scientists chip network phone company",
)
COMMON_WORDS = "the a of in on said new today after report week year".split()


def sentences(count: int, seed: int) -> list[tuple[str, int]]:
    """`count` (text, label) pairs: topic words mixed with common words, sometimes a word of another topic."""
    rng = random.Random(seed)
    topics = [words.split() for words in TOPIC_WORDS]
    rows = []
    for i in range(count):
        label = i % len(LABELS)
        words = [rng.choice(topics[label]) for _ in range(rng.randint(3, 6))]
        words += [rng.choice(COMMON_WORDS) for _ in range(rng.randint(2, 5))]
        if rng.random() < 0.3:
            words.append(rng.choice(topics[(label + 1) % len(LABELS)]))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def offline_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on `texts` ([CLS] text [SEP]), as a Hugging Face fast tokenizer."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        model_max_length=32,
    )


def text_task(count: int = 96, seed: int = 0) -> tuple[PreTrainedTokenizerFast, list[dict]]:
    """The tokenizer and the training rows: input_ids, token_type_ids, attention_mask, label, and the raw text
    (a column the model does not take: the Trainer must drop it)."""
    rows = sentences(count, seed)
    tokenizer = offline_tokenizer([text for text, _ in rows])
    return tokenizer, [{**tokenizer(text), "label": label, "text": text} for text, label in rows]


def tiny_bert(vocab_size: int, seed: int = 0, labels: tuple[str, ...] = LABELS) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    return BertForSequenceClassification(config)


def training_args(out: Path | str, **overrides) -> TrainingArguments:
    """Small CPU runs: no reporting, no progress bars, checkpoints only where asked."""
    settings = dict(
        output_dir=str(out), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-3, weight_decay=0.01,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def main(out: Path) -> None:
    from safetensors.torch import save_file

    from kd.integrations.transformers import CMatrixExport, LSPPForSequenceClassification

    tokenizer, rows = text_task()
    for mode in ("sync", "nosync"):
        model = LSPPForSequenceClassification(tiny_bert(len(tokenizer)))
        if mode == "nosync":
            model._ddp_params_and_buffers_to_ignore = ["lspp_bias.c_logits"]
        trainer = Trainer(
            model=model, args=training_args(out / mode, max_steps=6), train_dataset=rows, processing_class=tokenizer,
            callbacks=[CMatrixExport(dataset="synthetic-news")],
        )
        trainer.train()
        rank = trainer.args.process_index
        assert trainer.args.world_size == 2 and trainer.args.device.type == "cpu", (trainer.args.world_size, trainer.args.device)
        save_file(
            {"c_logits": model.lspp_bias.c_logits.detach().clone(),
             "classifier": model.model.classifier.weight.detach().clone()},
            out / f"{mode}-rank{rank}.safetensors",
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # Leave the process group before the interpreter exits: a gloo thread still running at exit
    # aborts the process ("terminate called without an active exception"), at random under load.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

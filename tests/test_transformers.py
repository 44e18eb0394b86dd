"""The Hugging Face integration (kd.integrations.transformers, the `text` extra) under an unmodified `Trainer`.

Everything is offline: a randomly initialised two-layer BERT from a config and a tokenizer
trained on the test's own sentences (tests/hf_ddp_worker.py builds both).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import DataCollatorWithPadding, Trainer  # noqa: E402

from kd import CMatrix, CMatrixError, KDError, LSPPLoss, ProxyTeacherLoss, load_cmatrix, save_cmatrix  # noqa: E402
from kd.integrations.transformers import (  # noqa: E402
    CMatrixExport,
    KDForSequenceClassification,
    LSPPForSequenceClassification,
    ProxyForSequenceClassification,
)
from kd.losses.functional import cross_entropy, hinton_loss  # noqa: E402
from tests.hf_ddp_worker import LABELS, text_task, tiny_bert, training_args  # noqa: E402
from tests.helpers import ENV, ROOT, TORCHRUN, assert_one_line_kderror, free_port  # noqa: E402


@pytest.fixture(scope="module")
def task():
    return text_task()


def batch(task, rows: slice = slice(0, 8)) -> dict[str, torch.Tensor]:
    """Padded model inputs and `labels` for some rows (without the raw text), as the Trainer's collator makes them."""
    tokenizer, data = task
    features = [{key: value for key, value in row.items() if key != "text"} for row in data[rows]]
    return dict(DataCollatorWithPadding(tokenizer)(features))


def train(task, model: nn.Module, out, callbacks=(), resume_from_checkpoint=None, **overrides) -> Trainer:
    tokenizer, rows = task
    trainer = Trainer(model=model, args=training_args(out, **overrides), train_dataset=rows, processing_class=tokenizer,
                      callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


# ----------------------------------------------------------------------------- LS++ under Trainer


def test_lspp_trains_c_under_trainer_and_exports_it_with_the_models_labels(task, tmp_path):
    tokenizer, _ = task
    model = LSPPForSequenceClassification(tiny_bert(len(tokenizer)))
    c_logits = model.lspp_bias.c_logits
    assert model.criterion is model.lspp_bias and torch.equal(c_logits, torch.zeros(4, 3))
    grads: list[float] = []
    c_logits.register_hook(lambda grad: grads.append(float(grad.abs().max())))

    trainer = train(task, model, tmp_path, callbacks=[CMatrixExport(dataset="synthetic-news")])

    assert trainer.label_names == ["labels"] and not trainer.model_accepts_loss_kwargs
    assert len(grads) == 8 and min(grads) > 0  # C got a gradient at every step
    assert torch.isfinite(c_logits).all() and c_logits.detach().abs().max() > 1e-4
    exported = load_cmatrix(tmp_path / "cmatrix.safetensors", expected_class_names=LABELS)
    assert exported.class_names == tuple(model.config.id2label[i] for i in range(4)) == LABELS
    assert torch.equal(exported.logits, c_logits.detach()) and exported.source == "lspp" and exported.alpha == 0.1
    assert exported.dataset == "synthetic-news" and exported.teacher_model == "bert"
    # The wrapper computes the toolkit's LS++ loss, not the model's own cross-entropy.
    model.eval()
    inputs = batch(task)
    labels = inputs.pop("labels")
    with torch.no_grad():
        output = model(**inputs, labels=labels)
        reference = LSPPLoss(4)
        reference.c_logits.copy_(c_logits)
        assert torch.equal(output.loss, reference(output.logits, labels))
        assert not torch.allclose(output.loss, cross_entropy(output.logits, labels))
        assert model(**inputs).loss is None
    # save_pretrained gives the plain Hugging Face model, and the C-matrix next to it.
    model.save_pretrained(tmp_path / "final")
    assert (tmp_path / "final" / "config.json").is_file()
    assert "classifier.weight" in load_file(tmp_path / "final" / "model.safetensors")
    assert torch.equal(load_cmatrix(tmp_path / "final" / "cmatrix.safetensors").logits, c_logits.detach())


def test_c_gets_no_weight_decay_and_the_models_weights_do(task, tmp_path):
    tokenizer, rows = task
    model = LSPPForSequenceClassification(tiny_bert(len(tokenizer)))
    trainer = Trainer(model=model, args=training_args(tmp_path, weight_decay=0.05), train_dataset=rows)
    groups = trainer.create_optimizer().param_groups

    def decay_of(parameter: torch.Tensor) -> list[float]:
        return [group["weight_decay"] for group in groups if any(p is parameter for p in group["params"])]

    assert decay_of(model.lspp_bias.c_logits) == [0.0]
    assert decay_of(model.model.classifier.weight) == [0.05]
    assert decay_of(model.model.bert.encoder.layer[0].attention.self.query.weight) == [0.05]
    assert model.no_weight_decay() == {"lspp_bias.c_logits"} <= dict(model.named_parameters()).keys()
    # The control: the same loss under a name without "bias" would be decayed by this Trainer.
    control = nn.Module()
    control.criterion = LSPPLoss(4)
    assert "criterion.c_logits" in trainer.get_decay_parameter_names(control)


def test_a_resumed_checkpoint_ends_with_the_uninterrupted_runs_c_and_weights(task, tmp_path):
    tokenizer, _ = task
    every_4 = dict(max_steps=8, save_strategy="steps", save_steps=4)
    whole = LSPPForSequenceClassification(tiny_bert(len(tokenizer), seed=0))
    train(task, whole, tmp_path / "whole", callbacks=[CMatrixExport()], **every_4)

    for step in (4, 8):  # each checkpoint holds C (in its weights) and its C-matrix file, the same
        folder = tmp_path / "whole" / f"checkpoint-{step}"
        in_weights = load_file(folder / "model.safetensors")["lspp_bias.c_logits"]
        assert torch.equal(load_cmatrix(folder / "cmatrix.safetensors").logits, in_weights)
        assert in_weights.abs().max() > 0

    # Another initial network and a random C: everything must come from checkpoint-4.
    resumed = LSPPForSequenceClassification(tiny_bert(len(tokenizer), seed=1))
    torch.nn.init.normal_(resumed.lspp_bias.c_logits)
    train(task, resumed, tmp_path / "resumed", callbacks=[CMatrixExport()],
          resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-4"), **every_4)

    assert torch.equal(resumed.lspp_bias.c_logits, whole.lspp_bias.c_logits)
    expected = whole.state_dict()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert torch.equal(load_cmatrix(tmp_path / "resumed" / "cmatrix.safetensors").logits, whole.lspp_bias.c_logits.detach())


def test_two_gloo_processes_end_with_the_same_c(tmp_path):
    env = dict(ENV)
    env.pop("ACCELERATE_USE_CPU", None)
    command = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "tests/hf_ddp_worker.py", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {name: load_file(tmp_path / f"{name}.safetensors") for name in ("sync-rank0", "sync-rank1", "nosync-rank0", "nosync-rank1")}

    c0, c1 = runs["sync-rank0"]["c_logits"], runs["sync-rank1"]["c_logits"]
    assert torch.equal(c0, c1) and c0.abs().max() > 1e-4
    assert torch.equal(runs["sync-rank0"]["classifier"], runs["sync-rank1"]["classifier"])
    assert torch.equal(load_cmatrix(tmp_path / "sync" / "cmatrix.safetensors", expected_class_names=LABELS).logits, c0)
    # The control: C logits that DDP does not all-reduce drift apart on the two ranks' shards.
    assert not torch.equal(runs["nosync-rank0"]["c_logits"], runs["nosync-rank1"]["c_logits"])
    assert torch.equal(runs["nosync-rank0"]["classifier"], runs["nosync-rank1"]["classifier"])


# ----------------------------------------------------------------------------- students


def test_proxy_and_kd_students_train_under_trainer(task, tmp_path):
    tokenizer, _ = task
    cmatrix = CMatrix.from_logits(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), class_names=LABELS, alpha=0.1)
    save_cmatrix(tmp_path / "cmatrix.safetensors", cmatrix)
    inputs = batch(task)
    labels = inputs.pop("labels")

    proxy = ProxyForSequenceClassification(tiny_bert(len(tokenizer), seed=2), tmp_path / "cmatrix.safetensors")
    before = proxy.model.classifier.weight.detach().clone()
    trainer = train(task, proxy, tmp_path / "proxy", learning_rate=5e-3)
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))
    assert not torch.equal(proxy.model.classifier.weight, before)
    proxy.eval()
    with torch.no_grad():
        output = proxy(**inputs, labels=labels)
        assert torch.equal(output.loss, ProxyTeacherLoss(cmatrix)(output.logits, labels))

    teacher = tiny_bert(len(tokenizer), seed=3)
    teacher_weights = {name: value.clone() for name, value in teacher.state_dict().items()}
    student = KDForSequenceClassification(tiny_bert(len(tokenizer), seed=4), teacher)
    before = student.model.classifier.weight.detach().clone()
    trainer = train(task, student, tmp_path / "kd", learning_rate=5e-3)
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))
    assert not torch.equal(student.model.classifier.weight, before)
    # The teacher is frozen, in eval mode, not optimised and not in the student's checkpoints.
    assert not teacher.training and all(torch.equal(value, teacher_weights[name]) for name, value in teacher.state_dict().items())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert all(name.startswith("model.") for name in student.state_dict())
    student.eval()
    with torch.no_grad():
        output = student(**inputs, labels=labels)
        expected = hinton_loss(output.logits, labels, teacher(**inputs).logits)["loss"]
        assert torch.equal(output.loss, expected)


def test_a_users_own_module_returning_logits_trains_with_lspp(task, tmp_path):
    """Any module works: its forward's named inputs decide which batch columns the Trainer keeps
    (here `token_type_ids` and the raw `text` go, `input_ids` and `attention_mask` stay)."""
    tokenizer, _ = task

    class BagOfWords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.EmbeddingBag(len(tokenizer), 16, mode="sum")
            self.head = nn.Linear(16, 4)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            weights = attention_mask.float() / attention_mask.sum(dim=1, keepdim=True)  # the mean over real tokens
            return self.head(self.embed(input_ids, per_sample_weights=weights))

    with pytest.raises(KDError) as error:
        LSPPForSequenceClassification(BagOfWords())
    assert_one_line_kderror(error, "config.id2label", "class_names")
    torch.manual_seed(0)
    model = LSPPForSequenceClassification(BagOfWords(), class_names=LABELS)
    train(task, model, tmp_path, callbacks=[CMatrixExport()])
    assert model.lspp_bias.c_logits.detach().abs().max() > 1e-4
    assert load_cmatrix(tmp_path / "cmatrix.safetensors").class_names == LABELS


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_a_one_line_error(task, tmp_path):
    tokenizer, _ = task
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    save_cmatrix(tmp_path / "other.safetensors", CMatrix.from_logits(logits, class_names=["a", "b", "c", "d"], alpha=0.1))
    with pytest.raises(CMatrixError) as error:
        ProxyForSequenceClassification(tiny_bert(len(tokenizer)), tmp_path / "other.safetensors")
    assert_one_line_kderror(error, "other.safetensors", "'World'", "config.id2label", error_type=CMatrixError)

    reordered = LABELS[1:] + LABELS[:1]
    save_cmatrix(tmp_path / "reordered.safetensors", CMatrix.from_logits(logits, class_names=reordered, alpha=0.1))
    with pytest.raises(CMatrixError) as error:
        ProxyForSequenceClassification(tiny_bert(len(tokenizer)), tmp_path / "reordered.safetensors")
    assert_one_line_kderror(error, "different order", "remap_by_name=True", error_type=CMatrixError, absent=("--remap",))
    remapped = ProxyForSequenceClassification(tiny_bert(len(tokenizer)), tmp_path / "reordered.safetensors", remap_by_name=True)
    assert remapped.proxy.class_names == LABELS

    with pytest.raises(KDError) as error:
        KDForSequenceClassification(tiny_bert(len(tokenizer)), tiny_bert(len(tokenizer), labels=reordered))
    assert_one_line_kderror(error, "teacher's classes", "id2label")

    with pytest.raises(KDError) as error:
        LSPPForSequenceClassification(tiny_bert(len(tokenizer)), alpha=1.5)
    assert_one_line_kderror(error, "alpha")

    proxy = ProxyForSequenceClassification(tiny_bert(len(tokenizer)), tmp_path / "reordered.safetensors", remap_by_name=True)
    with pytest.raises(KDError) as error:
        train(task, proxy, tmp_path / "proxy", callbacks=[CMatrixExport()])
    assert_one_line_kderror(error, "CMatrixExport", "LSPPForSequenceClassification")


def test_kd_imports_no_transformers_and_a_missing_extra_is_one_line():
    code = (
        "import sys, kd, kd.integrations\n"
        "assert 'transformers' not in sys.modules\n"
        "sys.modules['transformers'] = None\n"
        "try:\n"
        "    import kd.integrations.transformers\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        "kd.integrations.transformers needs the 'text' extra (transformers, tokenizers): pip install 'lspp-kd[text]'"
    ]

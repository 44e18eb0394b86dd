"""`--config FILE`: a YAML file or a previous run's config.json supplies flag values; the command line overrides it."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import assert_bitwise_equal, assert_one_line_error, kd_in_process, read_run, tensors

# Non-default values everywhere the re-made run could silently fall back to a default.
FLAGS = ["--epochs", "2", "--lr", "0.03", "--alpha", "0.2", "--augment", "crop", "--crop-padding", "2",
         "--seed", "3", "--model", "tiny_cnn", "--batch-size", "64", "--weight-decay", "0.001"]


def test_a_run_remade_from_its_config_json_gives_identical_weights(tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    assert kd_in_process("train-teacher", *FLAGS, "--out", str(first)).returncode == 0
    result = kd_in_process("train-teacher", "--config", str(first / "config.json"), "--out", str(again))
    assert result.returncode == 0, result.stderr
    assert_bitwise_equal(tensors(again / "model.safetensors"), tensors(first / "model.safetensors"))
    assert_bitwise_equal(tensors(again / "cmatrix.safetensors"), tensors(first / "cmatrix.safetensors"))
    old, new = read_run(first)[0], read_run(again)[0]
    assert {key: value for key, value in new.items() if key != "out"} == {key: value for key, value in old.items() if key != "out"}


def test_yaml_values_apply_and_the_command_line_overrides_them(tmp_path):
    config = tmp_path / "student.yaml"
    config.write_text("model: tiny_cnn\nepochs: 3\nmax-steps: 4\nlr: 0.02\nmethod: ls\nalpha: 0.3\naugment: [crop]\n")
    out = tmp_path / "run"
    result = kd_in_process("distill", "--config", str(config), "--epochs", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    recorded = read_run(out)[0]
    assert (recorded["model"], recorded["lr"], recorded["method"], recorded["alpha"], recorded["max_steps"]) == ("tiny_cnn", 0.02, "ls", 0.3, 4)
    assert recorded["augment"] == ["crop"]
    assert recorded["epochs"] == 1  # the command line wins


def test_config_file_problems_are_one_line_errors(tmp_path):
    out = str(tmp_path / "run")
    typo = tmp_path / "typo.yaml"
    typo.write_text("epochs: 2\nlearning_rate: 0.1\n")
    assert_one_line_error(kd_in_process("train-teacher", "--config", str(typo), "--out", out), "learning_rate", "not a flag")
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [2\n")
    assert_one_line_error(kd_in_process("train-teacher", "--config", str(broken), "--out", out), "not valid YAML")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    assert_one_line_error(kd_in_process("train-teacher", "--config", str(listing), "--out", out), "no mapping")
    teacher = tmp_path / "teacher"
    assert kd_in_process("train-teacher", "--model", "tiny_cnn", "--max-steps", "2", "--out", str(teacher)).returncode == 0
    assert_one_line_error(kd_in_process("distill", "--config", str(teacher / "config.json"), "--out", out),
                          "teacher run", "train-teacher --config")
    assert not Path(out).exists()

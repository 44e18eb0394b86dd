"""Run settings are declared once (kd.training.settings): flags, config.json, resume keys and the loop come from there."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from kd.errors import KDError
from kd.training.settings import (
    RUN_SETTINGS, Setting, Settings, check_settings, from_flags, recorded, resume_keys, settings_class,
)
from lspp_kd.cli.commands import distill_command, train_teacher_command
from lspp_kd.cli.options import settings_options
from lspp_kd.students.settings import STUDENT_SETTINGS, StudentSettings


def options_of(command: click.Command) -> dict[str, click.Option]:
    return {param.name: param for param in command.params if isinstance(param, click.Option)}


@pytest.mark.parametrize("command, declared", [
    (train_teacher_command, RUN_SETTINGS),
    (distill_command, RUN_SETTINGS + STUDENT_SETTINGS),
])
def test_every_declared_setting_is_a_flag_with_its_default_and_help(command, declared):
    options = options_of(command)
    for setting in declared:
        option = options[setting.name]
        assert setting.flag in option.opts
        assert option.default == setting.default and option.help == setting.help and option.required == setting.required
        assert option.is_flag == (setting.type is bool)
    assert not {s.name for s in STUDENT_SETTINGS} & set(options_of(train_teacher_command))


def test_the_settings_objects_are_the_declarations():
    assert [s.name for s in Settings.DECLARED] == [s.name for s in RUN_SETTINGS]
    assert [s.name for s in StudentSettings.DECLARED] == [s.name for s in RUN_SETTINGS + STUDENT_SETTINGS]
    defaults = Settings()
    assert all(getattr(defaults, s.name) == s.default for s in RUN_SETTINGS)
    assert defaults.method is None and defaults.method_params == {}


def test_a_run_records_every_declared_setting(digits_teacher):
    config = json.loads((digits_teacher / "config.json").read_text())
    for setting in RUN_SETTINGS:
        if setting.augment:  # recorded resolved, in augment_options
            assert setting.name not in config
            assert setting.name in config["augment_options"] or setting.name in ("crop_padding", "cutout_size")
        else:
            assert setting.name in config, setting.name
    assert (config["epochs"], config["max_steps"], config["batch_size"]) == (1, 20, 32)


def test_one_declaration_makes_a_flag_a_config_key_a_resume_key_and_a_check():
    """What adding a flag takes: one `Setting`; the rest follows from it."""
    warmup = Setting("warmup_epochs", 0, "Epochs of linear warm-up.", type=int, valid=lambda v: v >= 0, rule=">= 0", resume=True)
    Extended = settings_class("Extended", [warmup], base=Settings)
    received = []

    @click.command()
    @settings_options(Extended.DECLARED)
    def command(**options):
        received.append(from_flags(Extended, options, method_param_names=()))

    result = CliRunner().invoke(command, ["--out", "somewhere", "--warmup-epochs", "3", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    settings = received[0]
    assert (settings.warmup_epochs, settings.epochs, settings.out) == (3, 2, "somewhere")
    assert recorded(settings)["warmup_epochs"] == 3
    assert "warmup_epochs" in resume_keys(settings, derived=())
    assert "--warmup-epochs" in CliRunner().invoke(command, ["--help"]).output
    settings.warmup_epochs = -1
    with pytest.raises(KDError, match=r"^--warmup-epochs must be >= 0, got -1$"):
        check_settings(settings)


def test_method_parameters_go_to_method_params():
    settings = from_flags(Settings, {"epochs": 2, "alpha": 0.2, "c_loss": None}, method_param_names=("alpha", "c_loss"))
    assert settings.epochs == 2 and settings.method_params == {"alpha": 0.2, "c_loss": None}


@pytest.mark.parametrize("name, value, message", [
    ("epochs", 0, "--epochs must be a positive integer, got 0"),
    ("lr", 0.0, "--lr must be positive, got 0.0"),
    ("weight_decay", -1.0, "--weight-decay must be >= 0, got -1.0"),
    ("val_split", 1.0, "--val-split must be a fraction between 0 and 1 (exclusive), got 1.0"),
    ("eval_every", 2, "--eval-every evaluates on the validation split"),
])
def test_checks_come_from_the_declarations(name, value, message):
    settings = Settings(out="x")
    setattr(settings, name, value)
    with pytest.raises(KDError) as error:
        check_settings(settings)
    assert str(error.value).startswith(message)

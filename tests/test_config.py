"""glassgpt.config: choices declared as Literal[...] and checked in one place, and the architecture
options of train.py derived from GPTConfig (one place to add an option)."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from glassgpt.config import GPTOptions, TrainConfig, choices, help_text, load_config
from glassgpt.errors import UserError
from glassgpt.model import GPTConfig
from glassgpt.sourcefields import help_from_source

OWN = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "activation", "rope_scale")


def test_every_gpt_option_is_a_train_key_with_its_default_type_and_doc():
    hints, gpt_hints = typing.get_type_hints(TrainConfig), typing.get_type_hints(GPTConfig)
    train, gpt = TrainConfig(), GPTConfig()
    options = [f.name for f in dataclasses.fields(GPTConfig) if f.name not in OWN]
    assert options and [f.name for f in dataclasses.fields(GPTOptions)] == options
    help_ = help_text(TrainConfig, "train.py")
    for name in options:
        assert getattr(train, name) == getattr(gpt, name), name
        assert hints[name] == gpt_hints[name], name
        line = next(line for line in help_.splitlines() if line.startswith(f"  --{name}="))
        assert len(line) > len(f"  --{name}={getattr(gpt, name)!r}") + 10, f"no description for --{name}: {line!r}"
    assert help_from_source("glassgpt.config", "TrainConfig", "train.py") == help_


def test_a_gpt_option_set_on_the_command_line_reaches_the_model():
    from glassgpt.train import arch_options

    cfg = load_config(TrainConfig, ["--qk_norm", "--logit_softcap=30", "--rope_base=500"])
    assert GPTConfig(**arch_options(cfg)).qk_norm and GPTConfig(**arch_options(cfg)).logit_softcap == 30.0
    with pytest.raises(UserError, match="logit_softcap must be float or None"):
        load_config(TrainConfig, ["--logit_softcap=big"])


def test_literal_choices_from_arguments_and_config_files(tmp_path):
    assert choices(typing.get_type_hints(TrainConfig)["activation"]) == ("gelu", "gelu_new", "relu2")
    assert load_config(TrainConfig, ["--activation=None"]).activation is None
    assert load_config(TrainConfig, ["--activation=relu2"]).activation == "relu2"
    with pytest.raises(UserError, match=r"argument --optimizer=adam: optimizer='adam' is not one of adamw, muon; "
                                        r"did you mean adamw\?"):
        load_config(TrainConfig, ["--optimizer=adam"])
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("lr_schedule = 'linear'\n")
    with pytest.raises(UserError, match=f"config file {cfg_file}: lr_schedule='linear' is not one of cosine, wsd"):
        load_config(TrainConfig, [str(cfg_file)])

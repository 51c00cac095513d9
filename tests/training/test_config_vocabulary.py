"""``megatron_resonance.config_fields``: one help text per field, choices from ``Literal`` types, types from
``get_type_hints``, one ``from_dict`` (the command line's error lines: ``test_bad_input.py``)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from megatron_resonance import config_fields
from megatron_resonance.errors import ConfigError
from megatron_resonance.megatron.llama import SPECS, LlamaConfig
from megatron_resonance.posgen.presets import PROTOCOLS, Preset
from megatron_resonance.rope import KINDS, RopeConfig
from megatron_resonance.training.config import SECTIONS, ParallelConfig, add_config_arguments, from_dict

CLASSES = (LlamaConfig, RopeConfig, *SECTIONS.values(), Preset)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_field_has_its_help_written_once(cls):
    for f in dataclasses.fields(cls):
        assert config_fields.help_of(f), f"{cls.__name__}.{f.name} has no help"
        assert f.name in config_fields.field_types(cls)


def test_flags_take_help_and_type_from_the_fields():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    for cls in (LlamaConfig, RopeConfig, *SECTIONS.values()):
        for f in dataclasses.fields(cls):
            flag = config_fields.flag_of(f)
            if flag is None:
                assert f.name in ("rope", "head_dim", "correction_length")
                continue
            action = actions[flag]
            assert action.help.replace("%%", "%") == config_fields.help_of(f)
            assert action.default is None  # only a given flag overrides the file
    assert actions["rope_factor"].type is float and actions["num_layers"].type is int
    assert actions["optimizer"].type is str and actions["recompute_method"].type is str
    assert isinstance(actions["bf16"], argparse.BooleanOptionalAction)


def test_choices_are_the_literal_types():
    hints = config_fields.field_types
    assert config_fields.choices(hints(RopeConfig)["kind"]) == KINDS
    assert config_fields.choices(hints(ParallelConfig)["transformer_impl"]) == SPECS
    assert config_fields.choices(hints(ParallelConfig)["recompute_method"]) == ("uniform", "block")
    assert config_fields.choices(hints(Preset)["protocol"]) == tuple(PROTOCOLS)
    assert config_fields.choices(hints(ParallelConfig)["recompute_num_layers"]) == ()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: RopeConfig(kind="alibi"), f"unknown rope kind 'alibi'; expected one of {', '.join(KINDS)}"),
        (lambda: Preset(name="x", protocol="paper"), "unknown --protocol 'paper'; expected one of clean, reference"),
        (
            lambda: config_fields.check_choices(ParallelConfig(recompute_method="blocks")),
            "unknown --recompute-method 'blocks'; expected one of uniform, block",
        ),
    ],
)
def test_a_value_outside_the_choices_is_one_line(make, message):
    with pytest.raises(ConfigError) as info:
        make()
    assert str(info.value) == message


def test_none_is_a_choice_of_an_optional_literal():
    config_fields.check_choices(ParallelConfig(recompute_granularity=None))


@pytest.mark.parametrize(
    "read, message",
    [
        (lambda: LlamaConfig.from_dict({"num_layerz": 2}), "unknown config key(s) in model settings: num_layerz"),
        (lambda: RopeConfig.from_dict({"rope_theta": 1e4}), "unknown config key(s) in rope settings: rope_theta"),
        (lambda: from_dict({"optimizer": {"lr": 1, "betas": 2}}, "a.yaml"), "unknown config key(s) in a.yaml: "
                                                                           "optimizer: betas"),
        (lambda: RopeConfig.from_dict({"base": "high"}), "rope settings: base is 'high', expected a number"),
        (lambda: from_dict({"model": {"rope": {"kind": 3}}}, "a.yaml"), "a.yaml: model.rope.kind is 3, expected a "
                                                                       "string"),
    ],
)  # fmt: skip
def test_from_dict_names_the_key_or_the_value(read, message):
    with pytest.raises(ConfigError) as info:
        read()
    assert str(info.value) == message


def test_from_dict_round_trips_the_stored_configs():
    model = LlamaConfig(hidden_size=96, num_attention_heads=3, num_query_groups=1, rope=RopeConfig(kind="yarn"))
    assert LlamaConfig.from_dict(model.to_dict()) == model
    cfg = from_dict({"model": model.to_dict(), "optimizer": {"lr": "3e-4"}})
    assert cfg.model == model and cfg.optimizer.lr == 3e-4

"""ModelConfig validation and presets."""
from __future__ import annotations

import pytest

import llmkit
from llmkit.config import ConfigError, ModelConfig, alibi_slopes
from llmkit.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_roundtrips(name):
    config = llmkit.get_preset(name)
    assert ModelConfig.from_dict(config.to_dict()) == config
    model = llmkit.build_model(config)
    assert model.num_parameters() > 0


@pytest.mark.parametrize("changes, field, expected", [
    (dict(norm="batchnorm"), "norm", "one of"),
    (dict(n_heads=5), "n_heads", "divisor of d_model"),
    (dict(n_kv_heads=3), "n_kv_heads", "divisor of n_heads"),
    (dict(positional="rotary"), "positional", "'rope'"),
    (dict(sliding_window=0), "sliding_window", "positive"),
    (dict(causal=False, sliding_window=16), "sliding_window", "bidirectional"),
    (dict(d_model=-4), "d_model", "positive integer"),
    (dict(dropout=1.5), "dropout", "[0, 1)"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling", "low_freq_factor"),
    (dict(parallel_residual=True, norm_placement="post"), "parallel_residual", "pre"),
])
def test_bad_values_name_field_value_and_expectation(changes, field, expected):
    with pytest.raises(ConfigError) as err:
        llmkit.get_preset("llama-tiny", **changes)
    message = str(err.value)
    assert f"ModelConfig.{field}=" in message and expected in message
    assert repr(changes[field]) in message


def test_unknown_field_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'n_kv_heads'"):
        ModelConfig.from_dict({"n_kv_head": 2})
    with pytest.raises(ValueError, match="did you mean 'llama-tiny'"):
        llmkit.get_preset("lama-tiny")


def test_gqa_mqa_head_counts():
    assert llmkit.get_preset("llama-tiny").kv_heads == 2
    assert llmkit.get_preset("llama-tiny", n_kv_heads=1).kv_heads == 1       # MQA
    assert llmkit.get_preset("llama-tiny", n_kv_heads=None).kv_heads == 4    # MHA


def test_alibi_slopes_match_the_paper():
    # Press et al. 2022: for 8 heads the slopes are 1/2, 1/4, ..., 1/256.
    assert alibi_slopes(8) == pytest.approx([2.0 ** -(i + 1) for i in range(8)])
    # Non powers of two: the 4-head slopes, then every other slope of the 8-head sequence.
    assert alibi_slopes(6) == pytest.approx(alibi_slopes(4) + alibi_slopes(8)[0::2][:2])

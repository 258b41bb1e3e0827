"""One config from the edge down: flags and key=value arguments generated from the configs."""
import argparse

import pytest

from actors.config import ServeConfig
from engine.config import EngineConfig, PolicyConfig, auto_block_size
from engine.errors import InvalidRequestError
from engine.options import add_arguments, build, flatten, from_args, options, replace, to_argv


def test_every_policy_field_has_one_flat_name_and_help():
    names = {o.name: o for o in options(EngineConfig)}
    for field in PolicyConfig.__dataclass_fields__:
        flat = "policy" if field == "name" else field
        assert flat in names, field
        assert names[flat].path == ("policy", field)
        assert names[flat].help
    serve = {o.name for o in options(ServeConfig)}
    assert set(names) <= serve and {"num_workers", "kv_store_bytes", "api_keys"} <= serve


def test_key_value_text_is_parsed_by_type_and_reaches_the_nested_config():
    cfg = build(ServeConfig, {"policy": "lsa", "budget": "0.2", "block_size": "16", "cycle": "32",
                              "per_layer": "true", "target_layers": "1,3", "level2_topk": "none",
                              "num_workers": "2", "api_keys": "a,b", "worker_resources": "GPU=1,kv=0.5"})
    assert cfg.engine.policy.budget == 0.2 and cfg.engine.policy.cycle == 32 and cfg.engine.policy.per_layer
    assert cfg.engine.policy.target_layers == (1, 3) and cfg.engine.policy.level2_topk is None
    assert cfg.engine.cache.block_size == 16 and cfg.num_workers == 2
    assert cfg.api_keys == ["a", "b"] and cfg.worker_resources == {"GPU": 1.0, "kv": 0.5}


@pytest.mark.parametrize("values, words", [
    ({"num_worker": "2"}, "did you mean 'num_workers'"),
    ({"budget": "lots"}, "budget='lots' is not a valid float"),
    ({"budget": "1.5"}, "budget must be in (0, 1]"),
    ({"block_size": "24"}, "power of two"),
    ({"policy": "magic"}, "use one of full, lsa"),
    ({"cycle": "2.5"}, "not a valid int"),
    ({"per_layer": "maybe"}, "not a valid bool"),
    ({"max_num_seqs": "none"}, "needs a value"),
])
def test_bad_arguments_are_one_clear_error(values, words):
    with pytest.raises(InvalidRequestError, match=None) as info:
        build(ServeConfig, values)
    assert words in str(info.value)


def test_flatten_build_round_trip_and_replace():
    cfg = build(EngineConfig, {"policy": "quest", "budget": 0.3, "host_dtype": "fp8", "cuda_graphs": False})
    assert build(EngineConfig, flatten(cfg)) == cfg
    other = replace(cfg, budget=0.5, block_size=32)
    assert other.policy.budget == 0.5 and other.cache.block_size == 32 and other.policy.name == "quest"
    assert other.cache.host_dtype == "fp8" and cfg.policy.budget == 0.3


def test_argparse_flags_show_defaults_and_build_the_same_config():
    p = argparse.ArgumentParser()
    add_arguments(p, EngineConfig)
    help_text = p.format_help()
    assert "--min-resident-tokens" in help_text and "(default: 512)" in help_text
    assert "--no-per-layer" in help_text and "--cuda-graphs" in help_text
    args = p.parse_args(["--policy", "snapkv", "--budget", "0.25", "--no-host-mirror", "--target-layers", "2,5"])
    cfg = from_args(args, EngineConfig)
    assert cfg == build(EngineConfig, {"policy": "snapkv", "budget": 0.25, "host_mirror": False,
                                       "target_layers": (2, 5)})
    # the words to_argv writes rebuild the same config
    assert from_args(p.parse_args(to_argv(flatten(cfg), EngineConfig)), EngineConfig) == cfg
    with pytest.raises(SystemExit):
        p.parse_args(["--budget", "x"])


def test_block_size_is_chosen_for_the_context():
    assert [auto_block_size(n) for n in (2048, 8192, 16384, 32768, 131072)] == [16, 16, 16, 32, 64]
    assert EngineConfig().cache.block_size_for(8192) == 16
    assert build(EngineConfig, {"block_size": 64}).cache.block_size_for(8192) == 64

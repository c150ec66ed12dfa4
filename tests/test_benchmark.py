"""scripts/benchmark.py: lever parsing and the per-worker environment it implies."""

import pytest
from absl import app

from scripts import benchmark


def test_levers_parse():
    assert benchmark.parse_lever("default") == {}
    assert benchmark.parse_lever("conv=onednn+malloc=reuse") == {
        "conv": "onednn",
        "malloc": "reuse",
    }
    assert benchmark.parse_lever("xla_flags=--a=1 --b=2") == {"xla_flags": "--a=1 --b=2"}
    assert benchmark.parse_lever("steps=1") == {"steps": "1"}
    assert benchmark.parse_lever("act=float32+steps=1") == {"act": "float32", "steps": "1"}
    assert benchmark.parse_lever("bn=xla") == {"bn": "xla"}
    assert benchmark.parse_lever("pool=xla+bn=native") == {"pool": "xla", "bn": "native"}
    assert benchmark.MALLOC_ENV["reuse"]["MALLOC_MMAP_MAX_"] == "0"


@pytest.mark.parametrize(
    "lever, match",
    [
        ("conv", "bad --lever item"),
        ("threads=4", "keys: conv"),
        ("malloc=tcmalloc", "bad malloc lever"),
        ("steps=0", "bad steps lever"),
        ("steps=four", "bad steps lever"),
        ("act=bfloat16", "bad act lever"),
        ("bn=onednn", "bad bn lever"),
        ("pool=onednn", "bad pool lever"),
        ("conv=dot", "bad conv lever"),
        ("conv=im2col", "bad conv lever"),
    ],
)
def test_bad_levers_are_usage_errors(lever, match):
    with pytest.raises(app.UsageError, match=match):
        benchmark.parse_lever(lever)


def test_act_conv_bn_and_pool_levers_take_the_configs_values():
    from affect_jax.models import ACTIVATION_DTYPES
    from affect_jax.ops import batch_norm, conv, max_pool, native

    assert benchmark.ACTIVATION_DTYPES == ACTIVATION_DTYPES
    assert benchmark.IMPLS == native.IMPLS == conv.IMPLS == batch_norm.IMPLS == max_pool.IMPLS
    assert benchmark.CONV_PATHS == conv.PATHS

"""Fine-grained segmentation as a gin knob (arXiv:2401.06066 §3.1-§3.2, Eq 3-5): the MoE models are
written as (N, K, m, K_s, F) in gin/architectures/moe.gin, so a sweep over m or K_s is one binding."""

from __future__ import annotations

import pytest

from moe_jax.config import MoEConfig, fine_grained_sizes
from moe_jax.configs import gin_utils


def _moe(model: str, bindings=()):
    m = gin_utils.model_config_from_gin([gin_utils.model_gin_path(model)], bindings).moe
    return m.num_experts, m.top_k, m.num_shared_experts, m.expert_dim


def test_sizes_follow_eq_3_to_5():
    assert fine_grained_sizes(16, 2, 4, 1, 3412) == {
        "num_experts": 63,
        "top_k": 7,
        "num_shared_experts": 1,
        "expert_dim": 853,
    }
    assert MoEConfig.fine_grained(4, 4, 1, 4, 64) == MoEConfig(
        num_experts=0, top_k=0, num_shared_experts=4, expert_dim=64
    )


@pytest.mark.parametrize(
    "binding, expected",
    [
        ((), (63, 7, 1, 86)),  # deepseekmoe_tiny: (16, 2, 4, 1), F = 344
        (("GRANULARITY=1",), (15, 1, 1, 344)),
        (("GRANULARITY=2",), (31, 3, 1, 172)),
        (("GRANULARITY=8",), (127, 15, 1, 43)),
        (("NUM_SHARED=2",), (62, 6, 2, 86)),
        (("NUM_SHARED=0", "GRANULARITY=1"), (16, 2, 0, 344)),  # = gshard_tiny
        (("BASE_EXPERT_DIM=688",), (63, 7, 1, 172)),
        (("TOP_K=3",), (63, 3, 1, 86)),  # a derived size bound directly wins
        (("MoEConfig.top_k=4",), (63, 4, 1, 86)),  # as does a MoEConfig binding (the §4.5 analyses)
    ],
)
def test_one_binding_sweeps_m_or_ks(binding, expected):
    assert _moe("deepseekmoe_tiny", binding) == expected


def test_gshard_tiny_is_deepseekmoe_tiny_without_segmentation_and_isolation():
    assert _moe("gshard_tiny") == _moe("deepseekmoe_tiny", ["GRANULARITY=1", "NUM_SHARED=0"])


@pytest.mark.parametrize(
    "binding, message",
    [
        ("GRANULARITY=3", "F=344 is not divisible by granularity m=3"),
        ("NUM_SHARED=9", r"K_s=9 shared experts must be in \[0, m\*K=8\]"),
        ("BASE_TOP_K=17", "1 <= K <= N"),
        ("BASE_EXPERTS=None", "bind BASE_EXPERTS"),
    ],
)
def test_bad_segmentation_names_the_fix(binding, message):
    with pytest.raises(gin_utils.GinConfigError, match=message):
        _moe("deepseekmoe_tiny", [binding])

"""The operator's settings: DIFFCASCADE_* variables it cannot use are refused by name."""

from __future__ import annotations

import pytest
from diffcascade_operator.kube.settings import OperatorSettings


def test_router_settings_are_read_from_the_environment() -> None:
    settings = OperatorSettings.from_env(
        {
            "DIFFCASCADE_ROUTER": "false",
            "DIFFCASCADE_ROUTER_REPLICAS": "3",
            "DIFFCASCADE_ROUTER_PORT": "9000",
            "DIFFCASCADE_ROUTER_EXPLORATION": "0",
            "DIFFCASCADE_ROUTER_SCORER": "none",
        }
    )
    assert (settings.router, settings.router_replicas, settings.router_port) == (False, 3, 9000)
    assert (settings.router_exploration, settings.router_scorer) == (0.0, "none")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("ROUTER_REPLICAS", "x", "ROUTER_REPLICAS must be a whole number of at least 1, got 'x'"),
        ("ROUTER_REPLICAS", "0", "ROUTER_REPLICAS must be a whole number of at least 1, got '0'"),
        ("ROUTER_PORT", "70000", "ROUTER_PORT must be a whole number from 1 to 65535"),
        ("ROUTER_EXPLORATION", "0.6", "ROUTER_EXPLORATION must be a number from 0 to 0.5"),
        ("ROUTER_EXPLORATION", "nan", "ROUTER_EXPLORATION must be a number from 0 to 0.5"),
        ("ROUTER_SCORER", "best", "ROUTER_SCORER must be one of learned, rule, none, got 'best'"),
    ],
)
def test_a_router_setting_the_router_cannot_take_is_refused_by_name(
    key: str, value: str, message: str
) -> None:
    with pytest.raises(ValueError, match="DIFFCASCADE_" + message):
        OperatorSettings.from_env({"DIFFCASCADE_" + key: value})

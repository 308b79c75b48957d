"""Flags derived from the config dataclasses: every field is a flag with its docstring as help, the
command line's defaults are the dataclass's, repeatable flags become tuples, and a bad value stops the
process with the dataclass's own message. The flag names are the ones deploy/ and the README use."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from services.cli.main import build_parser
from services.common.config_flags import add_config_args, config_from_args, field_docs
from services.common.server import ServerConfig
from services.inference.engine import EngineConfig
from services.openai.config import OpenAIConfig
from services.router.config import RouterConfig


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("config", [RouterConfig, OpenAIConfig, EngineConfig, ServerConfig])
def test_every_field_is_a_flag_whose_help_is_its_docstring(config):
    parser = argparse.ArgumentParser()
    add_config_args(parser, config)
    by_dest = {action.dest: action for action in parser._actions}
    docs = field_docs(config)
    for field in dataclasses.fields(config):
        assert field.name in by_dest, f"{config.__name__}.{field.name} has no flag"
        assert docs[field.name] and by_dest[field.name].help.startswith(docs[field.name])


def test_the_command_lines_defaults_are_the_dataclasses():
    assert config_from_args(RouterConfig, parse("serve-router")) == RouterConfig(
        "127.0.0.1:50052", ("127.0.0.1:50053",)
    )
    assert config_from_args(OpenAIConfig, parse("serve-openai")) == OpenAIConfig()
    assert config_from_args(EngineConfig, parse("serve-inference")) == EngineConfig()
    # each service's own ports, the rest ServerConfig's
    assert ServerConfig.from_args(parse("serve-tokenizer")) == ServerConfig(port=50052, metrics_port=9102)
    assert ServerConfig.from_args(parse("serve-openai")) == ServerConfig(port=50054, metrics_port=9104)


def test_flags_as_deploy_and_the_readme_write_them():
    router = config_from_args(
        RouterConfig,
        parse(
            "serve-router",
            "--tokenizer-target=t:1",
            "--inference-target=a:1",
            "--inference-target=b:2",
            "--fallback-target=c:3",
            "--result-cache-redis=redis://r:6379/0",
            "--result-cache-mb=8",
            "--max-streams-per-tenant=8",
            "--drain-notice-s=0.5",
        ),
    )
    assert router.inference_targets == ("a:1", "b:2") and router.fallback_targets == ("c:3",)
    assert (router.tokenizer_target, router.result_cache_redis, router.result_cache_mb) == (
        "t:1",
        "redis://r:6379/0",
        8,
    )
    assert (router.max_streams_per_tenant, router.drain_notice_s) == (8, 0.5)
    engine = config_from_args(
        EngineConfig, parse("serve-inference", "--num-slots=32", "--max-waiting=0", "--max-prefill-tokens=64")
    )
    assert (engine.num_slots, engine.max_waiting, engine.max_prefill_tokens) == (32, 0, 64)
    openai = config_from_args(
        OpenAIConfig, parse("serve-openai", "--router-target=10.0.0.1:1", "--router-target=10.0.0.2:1")
    )
    assert openai.router_targets == ("10.0.0.1:1", "10.0.0.2:1")


def test_a_value_the_dataclass_refuses_stops_with_its_message():
    with pytest.raises(SystemExit, match="--max-streams-per-tenant must be >= 0"):
        config_from_args(RouterConfig, parse("serve-router", "--max-streams-per-tenant=-1"))
    with pytest.raises(SystemExit, match="num_slots must be >= 1"):
        config_from_args(EngineConfig, parse("serve-inference", "--num-slots=0"))

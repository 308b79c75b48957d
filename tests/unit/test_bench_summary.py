"""`services.bench.report.summarize`: the statistics of a benchmark run, without gRPC; and the
argument parsing of `meshserve bench` (services/cli/bench.py)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from services.bench.prompts import load_prompts
from services.bench.report import RequestResult, format_table, percentile, summarize
from services.bench.settings import MeshBenchSettings
from services.cli import bench
from services.common.config_flags import config_from_args


def ok(
    tokens: int = 10,
    ttft_s: float = 0.1,
    itl_s: list[float] | None = None,
    latency_s: float = 1.0,
    prompt_tokens: int = 5,
) -> RequestResult:
    return RequestResult(
        ok=True, tokens=tokens, ttft_s=ttft_s, itl_s=itl_s or [], latency_s=latency_s, prompt_tokens=prompt_tokens
    )


def failed(code: str, ttft_s: float | None = None, itl_s: list[float] | None = None, tokens: int = 0) -> RequestResult:
    return RequestResult(
        ok=False, code=code, tokens=tokens, ttft_s=ttft_s, itl_s=itl_s or [], latency_s=0.5, prompt_tokens=9
    )


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear_interpolation(q: float) -> None:
    values = [0.7, 0.1, 0.4, 2.5, 0.3, 0.9, 1.1]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_none_and_of_one_value_is_that_value() -> None:
    assert percentile([], 50) is None
    assert percentile([0.25], 99) == 0.25


def test_ttft_percentiles_in_milliseconds() -> None:
    # TTFTs 10, 20, ..., 100 ms: p50 = 55 ms, p90 = 91 ms, p99 = 99.1 ms (linear interpolation)
    results = [ok(ttft_s=(i + 1) / 100) for i in range(10)]
    report = summarize(results, wall_s=2.0)
    assert report["ttft_ms"]["p50"] == pytest.approx(55.0)
    assert report["ttft_ms"]["p90"] == pytest.approx(91.0)
    assert report["ttft_ms"]["p99"] == pytest.approx(99.1)
    assert report["ttft_ms"]["mean"] == pytest.approx(55.0)


def test_itl_pools_the_per_token_values_of_every_request() -> None:
    results = [ok(itl_s=[0.01, 0.01, 0.01]), ok(itl_s=[0.05])]
    report = summarize(results, wall_s=1.0)
    assert report["itl_ms"]["p50"] == pytest.approx(10.0)
    assert report["itl_ms"]["mean"] == pytest.approx((30 + 50) / 4)
    assert report["itl_ms"]["p99"] == pytest.approx(float(np.percentile([10, 10, 10, 50], 99)))


def test_tokens_and_aggregate_throughput_count_successful_requests_only() -> None:
    # the failed stream had streamed some tokens before it died: they are not a completion
    results = [ok(tokens=100), ok(tokens=28), failed("UNAVAILABLE", tokens=50)]
    report = summarize(results, wall_s=4.0)
    assert report["tokens"] == 128
    assert report["tokens_per_s"] == pytest.approx(32.0)
    assert report["prompt_tokens"] == 10


def test_errors_are_counted_by_status_code() -> None:
    results = [
        ok(),
        failed("RESOURCE_EXHAUSTED"),
        failed("UNAVAILABLE"),
        failed("RESOURCE_EXHAUSTED"),
    ]
    report = summarize(results, wall_s=1.0)
    assert report["requests"] == 4
    assert report["ok"] == 1
    assert report["errors"] == 3
    assert report["errors_by_code"] == {"RESOURCE_EXHAUSTED": 2, "UNAVAILABLE": 1}


def test_failed_requests_do_not_skew_latency_distributions() -> None:
    # a stream that died after a slow first token must not count towards TTFT or ITL
    results = [ok(ttft_s=0.02, itl_s=[0.01]), failed("INTERNAL", ttft_s=5.0, itl_s=[3.0])]
    report = summarize(results, wall_s=1.0)
    assert report["ttft_ms"]["p99"] == pytest.approx(20.0)
    assert report["itl_ms"]["p99"] == pytest.approx(10.0)


def test_all_failed_gives_empty_distributions_and_zero_throughput() -> None:
    report = summarize([failed("UNAVAILABLE"), failed("DEADLINE_EXCEEDED")], wall_s=1.0)
    assert report["tokens"] == 0
    assert report["tokens_per_s"] == 0.0
    assert report["ttft_ms"] == {"p50": None, "p90": None, "p99": None, "mean": None}
    assert report["itl_ms"]["mean"] is None
    assert report["per_stream_tokens_per_s_p50"] is None


def test_no_results_and_zero_wall_time_do_not_divide_by_zero() -> None:
    report = summarize([], wall_s=0.0)
    assert report["requests"] == 0
    assert report["errors"] == 0
    assert report["tokens_per_s"] is None


def test_per_stream_rate_excludes_the_time_to_first_token() -> None:
    # 11 tokens: the first after 1 s, ten more over the next 0.5 s -> 20 tok/s per stream
    report = summarize([ok(tokens=11, ttft_s=1.0, latency_s=1.5)], wall_s=1.5)
    assert report["per_stream_tokens_per_s_p50"] == pytest.approx(20.0)


def test_report_is_json_serialisable_and_renders_as_a_table() -> None:
    import json

    report = summarize([ok(itl_s=[0.01, 0.02]), failed("UNAVAILABLE")], wall_s=1.0)
    assert json.loads(json.dumps(report)) == report
    table = format_table(report)
    assert "TTFT" in table and "ITL" in table and "UNAVAILABLE=1" in table


def test_add_parser_registers_bench_with_its_defaults() -> None:
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--concurrency", "4"])
    assert args.func is bench.run_from_args
    assert (args.target, args.concurrency, args.max_tokens, args.chat, args.temperature, args.json) == (
        "localhost:8080",
        4,
        128,
        True,
        0.0,
        False,
    )
    assert parser.parse_args(["bench", "--no-chat"]).chat is False
    settings = config_from_args(MeshBenchSettings, parser.parse_args(["bench", "--concurrency", "3", "--timeout", "5"]))
    assert (settings.total_requests, settings.timeout_s, settings.seed) == (12, 5.0, None)
    for bad, flag_name in ((["--concurrency", "0"], "--concurrency"), (["--requests", "0"], "--requests")):
        with pytest.raises(SystemExit, match=flag_name):
            config_from_args(MeshBenchSettings, parser.parse_args(["bench", *bad]))


def test_load_prompts_reads_one_prompt_per_non_blank_line(tmp_path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\n  second prompt  \n")
    assert load_prompts(path) == ["first prompt", "second prompt"]
    assert len(load_prompts(None)) >= 16


def test_load_prompts_refuses_a_file_without_prompts(tmp_path) -> None:
    path = tmp_path / "blank.txt"
    path.write_text("\n   \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(path)


def test_bench_cli_exits_with_the_reason_when_the_prompt_file_is_empty(tmp_path) -> None:
    path = tmp_path / "blank.txt"
    path.write_text("\n")
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--prompts", str(path), "--target", "127.0.0.1:1"])
    with pytest.raises(SystemExit, match="holds no prompts"):
        args.func(args)

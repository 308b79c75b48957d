"""`meshserve serve-inference`: the inference service process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any, cast

from meshserve.inference.v1 import inference_service_pb2 as pb
from meshserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.config_flags import add_config_args, config_from_args
from services.common.contract import check_version_name
from services.common.cpus import (
    CpuSetError,
    available_cpus,
    check_cpus,
    format_cpu_list,
    parse_cpu_list,
    pin_current_process,
)
from services.common.errors import InvalidArgumentError
from services.common.metrics import EngineMetrics, kv_cache_usage_gauge, prefix_cache_counters
from services.common.server import ServerConfig, ServiceProcess, add_server_args
from services.inference.async_engine import AsyncEngine
from services.inference.backends import ort_ops
from services.inference.backends.base import StepBatch
from services.inference.backends.probes import BackendUnavailableError
from services.inference.backends.selection import BACKEND_CHOICES, create_backend, select_backend
from services.inference.constraints import GrammarCompiler
from services.inference.engine import Engine, EngineConfig
from services.inference.servicer import InferenceServicer
from services.modelstore.layout import ModelDirectory, add_models_root_arg, find_model
from services.modelstore.prepare import DEFAULT_PRECISION, PRECISIONS

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("serve-inference", help="run the inference service")
    add_server_args(parser, port=50053, metrics_port=9103)
    add_models_root_arg(parser)
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default=DEFAULT_PRECISION, help="which prepared weights to serve"
    )
    parser.add_argument(
        "--model-version",
        metavar="NAME",
        default=None,
        help="the model version this replica serves, as a router serving versions side by side names it "
        "(--model-version NAME=...): reported by GetModelInfo and a label of every metric (default: the "
        "model's revision, 12 hex digits, and its precision, e.g. 3f2a9c01b7de-int8)",
    )
    add_config_args(parser.add_argument_group("engine"), EngineConfig)
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("MESHSERVE_INFERENCE_THREADS", "0")),
        help="compute threads (0: one per core of --cpus, or ONNX Runtime's choice without it)",
    )
    parser.add_argument(
        "--cpus",
        metavar="LIST",
        default=None,
        help="run on these cores only, e.g. 0-3 or 1,5 (set at start; --threads 0 then means one per core)",
    )
    parser.set_defaults(func=run)


def served_precision(backend_name: str, backend: object, model: ModelDirectory) -> str:
    """The precision that runs. ONNX Runtime runs the directory's own decoder (`decoder_cpu.onnx`, in the
    directory's precision); TensorRT builds its engine from `decoder.onnx`, the dequantized float graph,
    in the precision it resolved (fp32, fp16 or bf16), whatever the directory's."""
    if backend_name == "tensorrt":
        return str(cast(Any, backend).precision)
    return model.precision


def model_version(requested: str | None, model: ModelDirectory) -> str:
    """The version name this replica reports: --model-version's (SystemExit in one sentence when it is
    not a version name), or the prepared directory's revision and precision."""
    if requested is None:
        return f"{model.revision[:12]}-{model.precision}"
    try:
        return check_version_name(requested, "--model-version")
    except InvalidArgumentError as error:
        raise SystemExit(f"meshserve serve-inference: --model-version: {error.description}") from None


def load_engine(name: str, args: argparse.Namespace, config: EngineConfig, model) -> Engine:
    """The engine over backend `name`, warmed by one tiny step so the first request does not pay
    for lazy initialisation."""
    options = (
        {"intra_op_threads": args.threads} if name == "onnxruntime" else {"max_prefill": config.max_prefill_tokens}
    )
    backend = create_backend(name, model, config.num_slots, config.max_context, **options)
    backend.forward(StepBatch.one_row([0]))
    return Engine(backend, config)


def pin_to_cpus(args: argparse.Namespace) -> None:
    """--cpus: this process runs on those cores. The compute threads follow the cores it may use (one per
    core unless --threads says otherwise), whether --cpus, taskset, a container's cpuset or Kubernetes'
    static CPU manager restricted them: ONNX Runtime's own default counts the machine's cores, and more
    spinning workers than cores only take turns. SystemExit with one sentence for a set this machine
    does not have."""
    if args.cpus:
        try:
            cores = parse_cpu_list(args.cpus)
            check_cpus(cores, available_cpus())
        except CpuSetError as error:
            raise SystemExit(f"meshserve serve-inference: --cpus {args.cpus}: {error}") from None
        pin_current_process(cores)
    allowed = available_cpus()
    if not args.threads and (args.cpus or len(allowed) < (os.cpu_count() or len(allowed))):
        args.threads = len(allowed)
    if args.cpus or args.threads:
        log.info("cores %s, %s compute threads", format_cpu_list(allowed), args.threads or "default")


def grammar_compiler(model: ModelDirectory) -> GrammarCompiler:
    """Constrained decoding over the model's own tokenizer (its vocabulary and end-of-sequence ids)."""
    return GrammarCompiler(model.tokenizer_path.read_text(), model.eos_token_ids, model.config.vocab_size)


async def serve(args: argparse.Namespace) -> None:
    pin_to_cpus(args)  # before the backend exists: its thread pool inherits the affinity
    try:  # fail at start-up, in one sentence, when the asked-for backend cannot run here
        backend_name, reason = select_backend(args.backend)
    except BackendUnavailableError as error:
        raise SystemExit(f"meshserve serve-inference: {error}") from None
    log.info("backend %s: %s", backend_name, reason)
    model = find_model(args.models_root, args.precision)
    if backend_name == "onnxruntime":
        try:  # the same, before a server starts, for a model whose decoder needs our operator library
            ort_ops.library_for(model.manifest)
        except BackendUnavailableError as error:
            raise SystemExit(f"meshserve serve-inference: {error}") from None
    version = model_version(args.model_version, model)
    process = ServiceProcess("meshserve-inference", ServerConfig.from_args(args))
    config = config_from_args(EngineConfig, args)
    metrics = EngineMetrics(model.name, version)
    async_engine = AsyncEngine(metrics)
    servicer = InferenceServicer(async_engine, config, model, "loading", version)
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, process.server)
    process.add_service(pb.DESCRIPTOR.services_by_name["InferenceService"].full_name)
    kv_gauge = kv_cache_usage_gauge(model.name, version)

    async def warm_up() -> None:
        engine = await asyncio.to_thread(load_engine, backend_name, args, config, model)
        async_engine.grammars = await asyncio.to_thread(grammar_compiler, model)
        servicer.backend_name = backend_name
        servicer.precision = served_precision(backend_name, engine.backend, model)
        async_engine.attach(engine)
        kv_gauge.set_function(lambda: engine.kv_cache_usage)
        prefix_cache_counters(
            model.name, lambda: engine.prefix_cache_queries, lambda: engine.prefix_cache_hits, version
        )

    async def on_drain() -> None:
        await async_engine.drain(args.shutdown_grace_s)

    await process.run(warm_up, on_drain)
    if async_engine.engine:
        async_engine.engine.stop()


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(args))
    return 0

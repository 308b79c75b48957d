"""Benchmarks of meshserve, as a library: what `meshserve bench`, `python -m services.bench.engine`
and the scripts in bench/ share, so every one of them measures the same work and reports it the
same way.

- `prompts`: the built-in prompts (and reading a prompt file);
- `pool`: keeping N requests in flight until M are done, with a progress line;
- `report`: per-request results (`RequestResult`), their statistics (`summarize`) and the table;
- `mesh`: the client of the public `GenerationService/Generate` stream (`meshserve bench`);
- `engine`: the engine alone, no gRPC (`python -m services.bench.engine`);
- `steps`: backend step timings and waiting for a quiet machine (bench/backend_steps.py and
  bench/engine_precisions.py).

It sits above the services (it drives the engine and the tokenizer core in one process) and below
the CLI, which only parses arguments.
"""

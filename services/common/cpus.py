"""Core sets for pinning inference replicas: Linux's cpulist syntax ("0-3,8"), the cores this process may
use, the NUMA nodes in /sys/devices/system/node, and one core set per replica placed so that no replica
spans two nodes where the machine has several.

Pinning matters because ONNX Runtime's intra-op workers spin while they wait: replicas that share cores
take turns on them, and one replica's threads on another node read their weights across the
interconnect. `serve-inference --cpus` pins itself (os.sched_setaffinity, before the session and its thread
pool exist) and sizes that pool to the set; `meshserve up --inference-cpus` hands each replica its set.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

NODE_ROOT = Path("/sys/devices/system/node")
"""Where Linux lists the NUMA nodes (node0/cpulist, ...); absent on kernels without NUMA support."""


class CpuSetError(ValueError):
    """A core set that cannot be used here; the message says why and what the machine has."""


def parse_cpu_list(text: str) -> frozenset[int]:
    """The cores of a cpulist ("0-3,8,10-11", as taskset, cgroups and /sys write them)."""
    cores: set[int] = set()
    for part in text.strip().split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise CpuSetError(f"{text!r} is not a core list: expected numbers and ranges like 0-3,8")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise CpuSetError(f"{text!r}: the range {part.strip()} runs backwards")
        cores.update(range(first, last + 1))
    return frozenset(cores)


def format_cpu_list(cores: frozenset[int] | set[int]) -> str:
    """The shortest cpulist of `cores`: {0, 1, 2, 5} -> "0-2,5"."""
    ranges: list[str] = []
    for core in sorted(cores):
        if ranges and core == int(ranges[-1].rpartition("-")[2]) + 1:
            ranges[-1] = f"{ranges[-1].partition('-')[0]}-{core}"
        else:
            ranges.append(str(core))
    return ",".join(ranges)


def available_cpus() -> frozenset[int]:
    """The cores this process may run on (its affinity: a container's cpuset, taskset, ...)."""
    return frozenset(os.sched_getaffinity(0))


def check_cpus(cores: frozenset[int], available: frozenset[int]) -> None:
    """CpuSetError naming the cores of `cores` that this machine (or this process) does not have."""
    if not cores:
        raise CpuSetError("the core set is empty")
    missing = cores - available
    if missing:
        raise CpuSetError(
            f"core set {format_cpu_list(cores)} names core(s) {format_cpu_list(missing)}, which this machine "
            f"does not have or this process may not use: it may use {format_cpu_list(available)}"
        )


def numa_nodes(root: Path = NODE_ROOT) -> dict[int, frozenset[int]]:
    """{node: its cores} from root/node*/cpulist, nodes without cores left out; {} where the kernel lists
    no nodes (then the machine is one node)."""
    nodes: dict[int, frozenset[int]] = {}
    for path in sorted(root.glob("node[0-9]*/cpulist")):
        cores = path.read_text().strip()
        if cores:  # a memory-only node (CXL, HBM) has an empty cpulist
            nodes[int(path.parent.name.removeprefix("node"))] = parse_cpu_list(cores)
    return nodes


def place_replicas(replicas: int, available: frozenset[int], nodes: dict[int, frozenset[int]]) -> list[frozenset[int]]:
    """One core set per replica, disjoint, covering the available cores: replicas go round-robin over the
    NUMA nodes (each node's available cores split evenly among its replicas, none spanning two nodes); with
    one node, or none listed, the cores are split in order. CpuSetError when there are fewer cores than
    replicas (a pinned replica needs a core of its own)."""
    if replicas < 1:
        raise CpuSetError("there must be at least one replica to place")
    if len(available) < replicas:
        raise CpuSetError(
            f"{replicas} pinned replicas need a core each, but this process may use {len(available)} "
            f"({format_cpu_list(available)})"
        )
    groups = [sorted(cores & available) for _, cores in sorted(nodes.items())]
    groups = [g for g in groups if g]
    placed_cores = set().union(*groups) if groups else set()
    if not groups or placed_cores != available:  # no node list, or cores it does not cover: one group
        groups = [sorted(available)]
    per_group = [0] * len(groups)
    for i in range(replicas):
        per_group[i % len(groups)] += 1
    while any(count > len(group) for count, group in zip(per_group, groups, strict=True)):
        # more replicas on a node than it has cores: move the extra ones to nodes with cores to spare
        over = next(i for i, group in enumerate(groups) if per_group[i] > len(group))
        spare = next(i for i, group in enumerate(groups) if per_group[i] < len(group))
        per_group[over] -= 1
        per_group[spare] += 1
    placement: list[tuple[int, frozenset[int]]] = []
    for g, (count, group) in enumerate(zip(per_group, groups, strict=True)):
        for j in range(count):
            share = group[len(group) * j // count : len(group) * (j + 1) // count]
            placement.append((g + len(groups) * j, frozenset(share)))  # round-robin order: replica i on node i % n
    return [cores for _, cores in sorted(placement, key=lambda item: item[0])]


def pin_current_process(cores: frozenset[int]) -> None:
    """Runs this process (and the threads it starts from now on) on `cores` only."""
    os.sched_setaffinity(0, cores)

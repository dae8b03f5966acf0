"""Many processes (hosts) in one run: each transcribes its own share of the inputs.

The processes never run a program together. Each one joins the run
(:func:`start_processes`, ``jax.distributed.initialize``), deals the input list with the
same deterministic rule (:func:`deal`, balanced by audio duration) and keeps its share, puts
the model on its own devices (:func:`whisperjax_cli.parallel.place_model`), decodes and
writes its outputs. The only exchange is at the end: the sums of failures and counts over
every process (:meth:`Processes.totals`, through the coordination service's key-value
store), so a file that fails anywhere makes the whole run exit 1. No step waits for another
host, and a slow file delays only its own process.

Every process must see the same input list (the same arguments over a shared file system):
the deal is worked out independently in each, nothing is sent. ``--skip-existing`` is
applied after the deal, to a process's own share: had it been applied before, a process that
had already written a file while another was still listing would change the other's deal.
A rerun therefore resumes: each process skips what it (or an earlier run) already wrote.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Optional, Sequence


from whisperjax_cli.errors import UsageError

TOTALS_WAIT_S = 7 * 24 * 3600  # how long a finished process waits for the slowest one's counts


def detected_cluster(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The multi-process launcher this process runs under, found in ``environ``, if the run
    has more than one process: ``"SLURM"``, ``"Open MPI"``, ``"TPU pod"``, or
    ``"JAX_COORDINATOR_ADDRESS"``; None otherwise (one process: nothing to join).

    These are the environments ``jax.distributed.initialize()`` reads by itself; a single
    task inside a SLURM allocation or an ``mpirun -np 1`` is left alone.
    """
    def many(name: str) -> bool:
        value = environ.get(name, "")
        return value.isdigit() and int(value) > 1

    if "SLURM_JOB_ID" in environ and many("SLURM_NTASKS") and "SLURM_PROCID" in environ:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in environ and many("OMPI_COMM_WORLD_SIZE"):
        return "Open MPI"
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    if "," in hosts or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU pod"
    if environ.get("JAX_COORDINATOR_ADDRESS") and many("JAX_NUM_PROCESSES"):
        return "JAX_COORDINATOR_ADDRESS"
    return None


@dataclasses.dataclass(frozen=True)
class DistributedRequest:
    """What the flags ask for: explicit coordinates, or JAX's own detection (all None)."""

    coordinator: Optional[str] = None  # HOST:PORT of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None


def distributed_request(coordinator: Optional[str], num_processes: Optional[int], process_id: Optional[int],
                        distributed: Optional[bool], environ: Mapping[str, str] = os.environ
                        ) -> Optional[DistributedRequest]:
    """Whether (and how) to join a multi-process run, from the flags and the environment.

    ``--coordinator``, ``--num-processes`` and ``--process-id`` go together; ``--distributed``
    alone asks JAX to find the processes itself, as does a detected launcher
    (:func:`detected_cluster`) unless ``--no-distributed`` is given.

    Raises:
      UsageError: an incomplete or inconsistent set of flags.
    """
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise UsageError("--coordinator", "needs --num-processes and --process-id (all three, or none)")
    if all(given):
        if distributed is False:
            raise UsageError("--no-distributed", "contradicts --coordinator")
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError("--coordinator", f"must be HOST:PORT, not {coordinator!r}")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UsageError("--process-id", f"must be from 0 to {num_processes - 1}, not {process_id}")
        return DistributedRequest(coordinator, num_processes, process_id)
    if distributed or (distributed is None and detected_cluster(environ) is not None):
        return DistributedRequest()
    return None


def audio_seconds(path) -> Optional[float]:
    """A file's duration from its header (soundfile: no audio decoded), or None when the
    header cannot tell (a format libsndfile does not read, stdin, a broken file)."""
    if path is None:
        return None
    try:
        import soundfile

        info = soundfile.info(str(path))
        return info.frames / info.samplerate if info.samplerate > 0 and info.frames >= 0 else None
    except Exception:  # noqa: BLE001 - any unreadable header: the duration is unknown
        return None


def deal(durations: Sequence[Optional[float]], count: int) -> list[list[int]]:
    """Splits inputs among ``count`` processes, balanced by duration; every process that is
    given the same durations computes the same split.

    Longest first, each to the process with the least audio so far (ties: the lower process
    id; equal durations: the earlier input). Unknown durations (None) count as the mean of
    the known ones (1 s when none is known). Each share lists its inputs in input order.
    """
    known = [d for d in durations if d is not None and d >= 0]
    mean = sum(known) / len(known) if known else 1.0
    sizes = [mean if d is None or d < 0 else float(d) for d in durations]
    loads = [0.0] * count
    shares: list[list[int]] = [[] for _ in range(count)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        p = min(range(count), key=lambda p: (loads[p], p))
        loads[p] += sizes[i]
        shares[p].append(i)
    return [sorted(s) for s in shares]


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place in the run: ``index`` of ``count`` (0 of 1 when alone)."""

    index: int = 0
    count: int = 1

    @property
    def first(self) -> bool:
        """Process 0 prints what is printed once (the summary, the errors of the input list)."""
        return self.index == 0

    def share(self, inputs: Sequence) -> list:
        """This process's inputs (``cli_files.Input`` s, or anything with a ``path``), dealt
        by duration (:func:`deal`); all of them when alone.

        Raises:
          UsageError: stdin (``-``) among the inputs of several processes.
        """
        if self.count == 1:
            return list(inputs)
        if any(getattr(i, "path", None) is None for i in inputs):
            raise UsageError(None, "'-' (stdin) cannot be shared among several processes")
        shares = deal([audio_seconds(i.path) for i in inputs], self.count)
        return [inputs[k] for k in shares[self.index]]

    def totals(self, counts: Sequence[int], tag: str = "totals", wait_s: int = TOTALS_WAIT_S) -> tuple[int, ...]:
        """``counts`` summed over every process, element by element.

        Every process must call this once per ``tag``; it waits (up to ``wait_s``) for the
        slowest. The values go through the coordination service's key-value store that
        ``jax.distributed.initialize`` started, not through a device collective: no program
        to compile, a bounded wait, and nothing asked of the devices (on CPU, gloo's
        collectives printed their connections on stdout, where results go). A process that
        dies is noticed by the coordination service's heartbeats, which ends the others.
        """
        if self.count == 1:
            return tuple(int(c) for c in counts)
        # JAX has no public handle on its key-value store; multihost_utils uses this one.
        from jax._src.distributed import global_state

        client = global_state.client
        if client is None:
            raise RuntimeError("jax.distributed is not initialised in this process")
        client.key_value_set(f"wjx/{tag}/{self.index}", json.dumps([int(c) for c in counts]))
        rows = [json.loads(client.blocking_key_value_get(f"wjx/{tag}/{p}", wait_s * 1000))
                for p in range(self.count)]
        return tuple(int(sum(column)) for column in zip(*rows))

    def close(self) -> None:
        """Leaves the run (``jax.distributed.shutdown``: waits for the other processes), so no
        process ends while another still talks to its coordination service."""
        if self.count > 1:
            import jax

            jax.distributed.shutdown()


def start_processes(request: Optional[DistributedRequest], device: Optional[str] = None,
                    threads: Optional[int] = None, timeout_s: int = 300) -> Processes:
    """Joins the run ``request`` describes (before JAX starts: see
    :func:`whisperjax_cli.runtime.start_distributed`); ``Processes()`` when it is None."""
    if request is None:
        return Processes()
    from whisperjax_cli import runtime

    index, count = runtime.start_distributed(request.coordinator, request.num_processes, request.process_id,
                                             device=device, threads=threads, timeout_s=timeout_s)
    return Processes(index, count)

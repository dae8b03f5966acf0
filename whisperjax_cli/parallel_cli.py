"""The command line on many devices and many processes: the flags, and ``wjx transcribe``'s body
with the hooks that use them (called by ``cli.run_transcribe``).

:func:`parallel_options` adds ``--devices``, ``--param-shards``, ``--coordinator``,
``--num-processes``, ``--process-id`` and ``--distributed/--no-distributed`` to a command; the
hooks join the run, spread the model over the devices, size the batch, and sum the counts over
the processes. This module does not import cli.py.
"""

from __future__ import annotations

from typing import Optional

import click

from whisperjax_cli.errors import UsageError
from whisperjax_cli.parallel_hosts import Processes, distributed_request, start_processes
from whisperjax_cli.progress import format_eta


def _devices_value(ctx, param, value) -> Optional[int]:
    """``--devices``: ``all`` (None) or a count of at least 1."""
    if value is None or str(value).lower() == "all":
        return None
    if not str(value).isdigit() or int(value) < 1:
        raise click.BadParameter(f"must be 'all' or a count of at least 1, not {value!r}")
    return int(value)


def parallel_options(fn):
    """Flags for running on several devices and several processes (hosts)."""
    options = [
        click.option("--devices", default="all", show_default=True, callback=_devices_value,
                     help="Devices of the chosen platform to spread each batch over: all, or a count."),
        click.option("--param-shards", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Split large parameters over this many devices each (a model too big for one)."),
        click.option("--coordinator", default=None, metavar="HOST:PORT",
                     help="Process 0's address, for a run of several processes (with the next two)."),
        click.option("--num-processes", type=click.IntRange(min=1), default=None, help="Processes in the run."),
        click.option("--process-id", type=click.IntRange(min=0), default=None, help="This process's number, from 0."),
        click.option("--distributed/--no-distributed", default=None,
                     help="Join a multi-process run found by JAX (SLURM, Open MPI, TPU pods) [yes when detected]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def process_options(fn):
    """Only the flags of a run of several processes (``wjx classify``: one device each)."""
    kept = {"coordinator", "num_processes", "process_id", "distributed"}
    fn = parallel_options(fn)
    fn.__click_params__[:] = [p for p in fn.__click_params__ if p.name in kept or p.name not in
                              {"devices", "param_shards"}]
    return fn


def start_run(o: dict) -> Processes:
    """Joins the run the flags (or the environment) describe; before JAX starts.

    Raises:
      UsageError: inconsistent flags, or several processes writing to stdout (``-o -``).
    """
    request = distributed_request(o.get("coordinator"), o.get("num_processes"), o.get("process_id"),
                                  o.get("distributed"))
    if request is not None and o.get("output_dir") == "-":
        raise UsageError(None, "-o - (stdout) cannot be shared by several processes: give an output folder")
    return start_processes(request, o.get("device"), o.get("threads"))


def spread_model(model, o: dict):
    """``model`` on this process's ``--devices`` (a mesh; the model itself for one device).

    Raises:
      UsageError: more devices asked than there are, or ``--param-shards`` not dividing them.
    """
    from whisperjax_cli import runtime
    from whisperjax_cli.parallel import place_model

    devices = runtime.select_devices(o.get("device"), o.get("devices"))
    shards = o.get("param_shards") or 1
    if len(devices) % shards:
        raise UsageError("--param-shards", f"must divide the {len(devices)} devices, not {shards}")
    return place_model(model, devices, shards)


def batch_options(options, model, given: Optional[int]):
    """``options`` with the batch size for ``model``'s devices: ``given`` (``--batch-size``,
    all devices together), or per device what its memory holds times the devices
    (:func:`whisperjax_cli.parallel.default_batch_size`; 8 on a CPU, as before)."""
    import jax
    import numpy as np

    from whisperjax_cli.options import MAX_BATCH, TranscribeOptions
    from whisperjax_cli.parallel import default_batch_size, placement_of, total_batch_size

    if given is not None:
        return options
    placement = placement_of(model.params)
    devices = [jax.tree.leaves(model.params)[0].devices().pop()] if placement is None else list(
        placement.mesh.devices.flat)
    sampled = any(t > 0 for t in options.temperatures)
    rows = max(options.beam_size or 1, (options.best_of or 1) if sampled else 1)
    per_device = default_batch_size(devices[0], model.dims, np.dtype(model.dtype).itemsize, rows)
    total = min(MAX_BATCH, total_batch_size(per_device, 1 if placement is None else placement.size))
    return TranscribeOptions.create(options, batch_size=total)


def summary_line(where: str, written: int, failed: int, skipped: int, audio: float, wall: float, processes: int) -> str:
    """The closing line of a run of several processes (Reporter.summary's, over all of them),
    without the ``wjx: `` that :func:`~whisperjax_cli.cli_common.say` adds."""
    parts = [f"{written} written to {where} by {processes} processes"]
    parts += [f"{failed} failed"] if failed else []
    parts += [f"{skipped} skipped"] if skipped else []
    rtfx = f", {audio / wall:.1f}x real time" if wall > 0 and audio > 0 else ""
    return f"{', '.join(parts)}; {format_eta(audio)} of audio in {wall:.1f} s{rtfx}"

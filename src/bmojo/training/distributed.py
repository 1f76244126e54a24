"""Data-parallel training over many processes and nodes with PyTorch's own engine.

``torchrun`` starts the processes (one per GPU, or several on CPU) and sets ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE``; ``torch.distributed`` connects them (NCCL on CUDA, gloo on
CPU); DistributedDataParallel, or FSDP2's ``fully_shard`` for models that do not fit one
device, keeps the replicas in step. Nothing here launches a process or implements a
collective: this module only joins the job, wraps the model, offers the three collectives the
trainer needs (sum, broadcast from rank 0, barrier) and ends the process cleanly.

Ending cleanly matters: with gloo on CPU a worker that simply returns from ``main`` aborts at
interpreter exit in about a third of runs, so :func:`run_distributed` destroys the process
group, flushes the streams and leaves with ``os._exit``. A worker that fails prints its rank
and traceback and exits non-zero at once; torchrun then stops the other workers (which would
otherwise wait in their next collective), so the job ends with the failing rank's error. The
others often fail too in that collective ("Connection closed by peer"); torchrun's summary
would then name the lowest rank that failed in the same second as the root cause, so only the
job's first failure is reported to torchrun and later ones wait to be stopped.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from bmojo.device import device_or_default

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
# How long a collective waits for the other processes before it fails (instead of hanging forever
# when a process died outside torchrun's watch). Long enough for rank 0 to write a checkpoint.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
FAILURE_COUNTER = "bmojo/failed_processes"  # key in the process group's store
LATER_FAILURE_WAIT_S = 10.0  # longer than torchrun's --monitor-interval (0.1 s by default)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job; the default is a plain single-process run.

    ``world_size > 1`` means a process group is initialised and the collectives below really
    communicate; with one process they return their argument.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    fsdp: bool = False  # shard parameters, gradients and optimizer state with FSDP2 (else DDP)

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, shows the progress bar and writes every file but the sharded checkpoint."""
        return self.rank == 0

    def rows(self, batch_rows: int) -> slice:
        """This process's contiguous share of a global batch of ``batch_rows`` rows."""
        if batch_rows % self.world_size:
            raise ValueError(f"a batch of {batch_rows} rows cannot be split evenly between {self.world_size} "
                             f"processes: make batch_size a multiple of the number of processes")
        share = batch_rows // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all processes (in place)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (any picklable value), on every process."""
        if self.world_size == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def barrier(self) -> None:
        """Wait until every process is here."""
        if self.world_size > 1:
            dist.barrier()


def launched_by_torchrun() -> bool:
    """Whether this process is a torchrun worker (torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def init_distributed(device: str | None = None, fsdp: bool = False,
                     timeout: datetime.timedelta = COLLECTIVE_TIMEOUT) -> tuple[Distributed, torch.device]:
    """Join the torchrun job: the process group (NCCL on CUDA, gloo on CPU) and this process's
    device (``cuda:LOCAL_RANK``, or the CPU). ``device`` is a device type, ``None`` for CUDA if
    available, else CPU."""
    if not launched_by_torchrun():
        raise ValueError("distributed training needs the processes started by torchrun "
                         f"({', '.join(TORCHRUN_VARIABLES)} are not all set)")
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed: distributed training is not possible")
    rank, local_rank, world_size = (int(os.environ[name]) for name in TORCHRUN_VARIABLES)
    requested = torch.device(device_or_default(device))
    if requested.index is not None:
        raise ValueError(f"--device {device}: under torchrun every process takes the GPU of its LOCAL_RANK; "
                         f"pass a device type (--device cuda) without an index")
    if requested.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs: "
                             f"--nproc_per_node must not exceed the GPUs per node")
        local_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(local_device)
        dist.init_process_group("nccl", timeout=timeout, device_id=local_device)
    elif requested.type == "cpu":
        local_device = requested
        dist.init_process_group("gloo", timeout=timeout)
    else:
        raise ValueError(f"distributed training runs on CUDA (NCCL) or on the CPU (gloo), not on {requested.type}")
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, fsdp=fsdp), local_device


def wrap_model(model: nn.Module, distributed: Distributed, device: torch.device, precision: str) -> nn.Module:
    """The module the training forward runs through: ``model`` sharded in place by FSDP2, or
    ``model`` in DistributedDataParallel, or ``model`` itself in a single process.

    FSDP2 shards every block, then the root (embedding, final norm and the head, which may be
    tied to the embedding), and all-gathers a block's parameters just before it runs. Its
    mixed-precision policy computes in bf16 when the run's ``precision`` is bf16 and always
    reduces gradients in fp32. FSDP2 replaces the parameters by sharded ones (DTensors): build
    the optimizer after this call.
    """
    if distributed.fsdp:
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError as err:
            raise ValueError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, PyTorch >= 2.6); "
                             f"this is PyTorch {torch.__version__}") from err
        mesh = init_device_mesh(device.type, (distributed.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                      reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model
    if distributed.world_size > 1:
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def _end_process(code: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _first_failure() -> bool:
    """Whether this process is the first of the job to fail (a counter in the process group's
    store). Later failures are usually its consequence, in the collective it left."""
    try:
        return dist.distributed_c10d._get_default_store().add(FAILURE_COUNTER, 1) == 1
    except (ValueError, RuntimeError):  # no process group yet, or its store is gone: count this failure as first
        return True


def _fail(err: BaseException, message: str, code: int) -> NoReturn:
    """Print ``message``; the first failure is recorded in torchrun's error file (its summary
    names it as the root cause) and ends the process at once, a later one waits for torchrun
    to stop it."""
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    print(message, file=sys.stderr)
    if _first_failure():
        get_error_handler().record_exception(err)
    else:
        sys.stderr.flush()
        time.sleep(LATER_FAILURE_WAIT_S)
    _end_process(code)


def run_distributed(job: Callable[[Distributed, torch.device], int], device: str | None = None,
                    fsdp: bool = False) -> NoReturn:
    """Run ``job(distributed, device)`` in this torchrun worker, then end the process.

    Success (``job`` returns 0): every process meets at a barrier, the process group is
    destroyed, the streams are flushed and the process exits with ``os._exit(0)``. A non-zero
    return ends this process at once, without waiting for the others: torchrun stops them. So
    does a user error (``ValueError``, ``FileNotFoundError``: ``error: [rank R] ...``, exit 2) or
    any other exception (``rank R failed:`` and the traceback, exit 1), see :func:`_fail`.
    """
    rank = os.environ.get("RANK", "?")
    try:
        distributed, local_device = init_distributed(device, fsdp)
        code = job(distributed, local_device)
    except (ValueError, FileNotFoundError) as err:
        _fail(err, f"error: [rank {rank}] {err}", 2)
    except BaseException as err:  # any failure, KeyboardInterrupt included, ends this rank
        _fail(err, f"rank {rank} failed:\n{traceback.format_exc()}", 1)
    if code == 0:
        distributed.barrier()
        dist.destroy_process_group()
    _end_process(code)

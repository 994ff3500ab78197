"""
Processes under torchrun: the process group, the model wrapped for DDP or
FSDP2, gradient synchronisation, sums over ranks and whole state dicts.
Nothing here is home-made distributed code: it is PyTorch's, set up once.

The rule that keeps a distributed run from hanging: every rank calls the same
collectives, in the same order, the same number of times. Under FSDP every
forward pass is a collective (it all-gathers the parameters), so every loop
that runs forward passes runs the same number of iterations on every rank:
evaluation pads its last round with a batch whose figures are not counted,
generation goes on until every rank is done, and anything computed on one
rank's share only (the DPO reference log-probs) uses the unsharded starting
weights, whose forwards are not collectives. A decision that one rank makes
(a failed checkpoint write, where a resumed run starts) is shared with
all_reduce before any rank acts on it. When a collective still does not
complete (a process stuck or gone), the process group's timeout ends it and
train.py stops with one line naming the rank and the phase.
"""

import contextlib
import datetime
import os

import torch

from configurator import ConfigError, fail


def init_process_group(device_name, timeout_s):
    """rank, local_rank, world_size; initialises the process group under torchrun, its collectives failing
    after timeout_s seconds instead of waiting forever."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    (rank, world), local_rank = rank_and_world(), int(os.environ["LOCAL_RANK"])
    # CPU tensors (the step's target count) go through gloo even when CUDA tensors go through NCCL
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and not device_name.startswith("cpu") else "gloo"
    torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return rank, local_rank, world


def rank_and_world():
    """(rank, world size) as torchrun set them; (0, 1) without torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_collective_failure(error):
    """Whether an exception is a collective that failed or timed out (gloo raises plain RuntimeErrors that say
    so, NCCL DistBackendErrors), not a bug of ours that would deserve its traceback."""
    if isinstance(error, torch.distributed.DistError):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in ("gloo", "Gloo", "NCCL", "c10d"))


def shard(model, ptdtype, reshard_root=None):
    """FSDP2: fully_shard each block, then the whole (the root: embedding, final norm, head), parameters
    computing in ptdtype; reshard_root=False keeps the root's parameters gathered after its forward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=torch.float32) if ptdtype != torch.float32 else None
    kwargs = {"mp_policy": mp} if mp else {}
    for block in model.model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_root, **kwargs)


def wrap_model(model, dev, ptdtype, world, local_rank, fsdp=False, compile=False, compile_mode="default"):
    """FSDP2 (fully_shard per block, then the whole) or DDP when there are several processes; torch.compile
    when asked (after sharding, before DDP, as PyTorch recommends for each)."""
    if world > 1 and fsdp:
        shard(model, ptdtype)
    if compile:
        model = torch.compile(model, mode=compile_mode)
    if world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[local_rank] if dev.type == "cuda" else None)
    return model


def wrap_frozen(model, ptdtype, world, fsdp=False, compile=False, compile_mode="default"):
    """A frozen second model (a distillation teacher) wrapped as the trained one is: sharded like it under FSDP,
    compiled when it is. The root's parameters stay gathered after a forward, so that its head can be applied
    outside that forward (in the student's: losses.distill_loss)."""
    if world > 1 and fsdp:
        shard(model, ptdtype, reshard_root=False)
    return torch.compile(model, mode=compile_mode) if compile else model


def param_dtype(ptdtype, world, fsdp):
    """The dtype a wrapped model's parameters compute in: ptdtype under FSDP's mixed precision, which casts them;
    float32 otherwise, where autocast casts the inputs of each operation instead (norms and the residual stream then
    stay float32)."""
    return ptdtype if world > 1 and fsdp else torch.float32


def gradient_sync(model, world, fsdp, last):
    """A context for one micro-step's backward: gradients are reduced over ranks only on the last one."""
    if world == 1 or last:
        if fsdp:
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if fsdp:
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return model.no_sync()


def clip_grad_norm(model, max_norm):
    """The global gradient norm (every rank the same, sharded or not), clipped to max_norm when > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def all_reduce_sum(t, world):
    if world > 1:
        torch.distributed.all_reduce(t)
    return t


def any_rank(flag, world):
    """Whether `flag` is true on any rank (a collective: every rank calls it)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)]), world).item() > 0)


def together(fn, rank, world, what):
    """fn() on every rank, where it may fail (a ConfigError, one line) on some ranks only, as work done by rank 0
    alone can; then every rank stops if any rank failed, instead of waiting for it in the next collective."""
    error, result = None, None
    try:
        result = fn()
    except ConfigError as e:
        error = e
    if any_rank(error is not None, world):
        if error is not None:
            raise error
        fail(f"rank {rank}: {what} failed on another rank (its line above says why)")
    return result


def spread(value, world):
    """(smallest, largest) of a number over the ranks (a collective: every rank calls it)."""
    t = torch.tensor([float(value), -float(value)])
    if world > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return -t[1].item(), t[0].item()


def full_state_dicts(model, optimizer):
    """Whole (unsharded) model and optimizer state dicts on the CPU; a collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dicts(model, optimizer, model_sd, optim_sd):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))


def destroy(world):
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

"""
Processes under torchrun: the process group, the model wrapped for DDP or
FSDP2, gradient synchronisation, sums over ranks and whole state dicts.
Nothing here is home-made distributed code: it is PyTorch's, set up once.
"""

import contextlib
import os

import torch


def init_process_group(device_name):
    """rank, local_rank, world_size; initialises the process group under torchrun."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    # CPU tensors (the step's target count) go through gloo even when CUDA tensors go through NCCL
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and not device_name.startswith("cpu") else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return rank, local_rank, world


def wrap_model(model, dev, ptdtype, world, local_rank, fsdp=False, compile=False, compile_mode="default"):
    """FSDP2 (fully_shard per block, then the whole) or DDP when there are several processes; torch.compile
    when asked (after sharding, before DDP, as PyTorch recommends for each)."""
    if world > 1 and fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=torch.float32) if ptdtype != torch.float32 else None
        kwargs = {"mp_policy": mp} if mp else {}
        for block in model.model.layers:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
    if compile:
        model = torch.compile(model, mode=compile_mode)
    if world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[local_rank] if dev.type == "cuda" else None)
    return model


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


def barrier(world):
    if world > 1:
        torch.distributed.barrier()


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
        torch.distributed.destroy_process_group()

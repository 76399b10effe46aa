"""Several processes (torchrun): who am I, share out the work, gather it back in order.

    torchrun --nproc_per_node 2 macpo.py --parallel ddp ...    # data parallel: full copies, gradients averaged
    torchrun --nproc_per_node 8 macpo.py --parallel fsdp ...   # training state sharded across ranks (FSDP2)

With one process (plain `python macpo.py`) every function here is a no-op, so the rest of the code reads as
single-process code; the device and its dtype are chosen here too. Imports torch only.
"""
import atexit
import os

import torch
import torch.distributed as dist


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}       # --dtype's choices besides "auto"


def dtype_for(device, dtype="auto"):
    """The weights' dtype (--dtype) -> a torch dtype. "auto": bf16 on CUDA, float32 on CPU (a CPU runs bf16
    matrix products 10-100x slower than fp32). float16 is not offered: without loss scaling its 5-bit exponent
    flushes small gradients to zero, and bf16 has float32's range."""
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return DTYPES[dtype]


def dtype_kwargs(device, dtype="auto"):
    """The keyword that makes transformers' from_pretrained / from_config build the weights in dtype_for(device,
    dtype): {"dtype": ...} ("torch_dtype" before transformers 4.56). Building in the dtype, rather than
    model.to(dtype) after, keeps the buffers transformers computes in float32 in float32: Llama's rotary
    inv_freq cast to bf16 is off by up to 2^-9 of itself, which at position 1000 turns an angle by up to ~1
    radian."""
    from importlib.metadata import version
    major, minor = (int(x) for x in version("transformers").split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype_for(device, dtype)}


def setup(device):
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU. -> this rank's
    device (cuda:LOCAL_RANK on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        # left to the interpreter's exit, gloo's threads are sometimes destroyed while still joinable and the
        # rank aborts ("terminate called without an active exception", exit -6) after finishing its work
        atexit.register(_teardown)
        if cuda:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    return device


def _teardown():
    if dist.is_initialized():           # no barrier: a rank leaving on an error must not wait for the others
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    """Only rank 0 writes files and prints."""
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def mine(items, padded=False):
    """This rank's share of a list, round-robin: rank r takes items r, r + W, r + 2W, ... padded: with None
    appended up to the largest share, so that every rank gets as many (work on a sharded model is a collective:
    every rank must run as many passes; a None is padding work whose results are dropped)."""
    share = items[rank()::world_size()]
    return share + [None] * (-(-len(items) // world_size()) - len(share)) if padded else share


def chunk_bounds(n, part, parts):
    """Rows [start, stop) of an n-row tensor that part `part` of `parts` holds when it is cut the way
    torch.chunk cuts it, which is how FSDP2 shards dim 0: every part but the last ones has ceil(n / parts)
    rows, so n = 5 over 4 parts is 2, 2, 1, 0 rows (a part may be empty)."""
    size = -(-n // parts)                                          # ceil(n / parts)
    start = min(part * size, n)
    return start, min(start + size, n)


def gather(pairs):
    """[(index, value)] computed on this rank -> every rank's pairs, sorted by index (the original order)."""
    if world_size() == 1:
        return sorted(pairs, key=lambda p: p[0])
    everyone = [None] * world_size()
    dist.all_gather_object(everyone, pairs)
    return sorted((p for part in everyone for p in part), key=lambda p: p[0])


def all_true(flag):
    """A 0-dim bool tensor -> bool, True only when it is True on every rank (a collective)."""
    if world_size() == 1:
        return bool(flag)
    flag = flag.to(torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def mean(values):
    """Average a 1-D float tensor over ranks (for logged statistics)."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= world_size()
    return values

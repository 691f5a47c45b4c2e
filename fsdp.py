"""SASQ on several GPUs: train.py under torchrun, the frozen weights sharded by FSDP2.

    torchrun --nproc-per-node 2 train.py --ckpt llama-2-13b --checkpointing      # one node, 2 GPUs
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py ...
    torchrun --nproc-per-node 4 fsdp.py --shape 70b --checkpointing             # speed/memory, random weights

What changes against one process, and why it stays the same method:
  1. Loading: rank 0 reads the checkpoint into host memory (one copy per node, not one per rank) and cuts
     the text into windows; every rank builds the model on the meta device, `fully_shard`s each decoder
     block and then the root, and rank 0's weights are broadcast into the shards.
  2. The quantizers are attached after sharding, so FSDP never sees them: their few parameters are
     ordinary tensors, identical on every rank, and their gradients are averaged by one all-reduce per
     step. Adam then takes the same step everywhere, so they stay identical.
  3. Batches: each global batch of world x --batch-size windows is drawn by the same generator as one
     process would draw it; rank r takes its r-th slice. Averaging the gradients gives the gradient of
     the global batch's mean loss (every slice has the same number of tokens).
  4. Calibration: each rank observes its slice of every calibration batch; an all-reduce MAX of the
     per-batch absmax rows gives exactly the rows one process computes, so max and mean inits agree.
  5. Rank 0 alone prints and writes (scales, state, logs); every rank reads the state on --resume.
With world size 1 each of these is the identity: train.py's single-process code path.
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

import model as llama


class Comm:
    """The collectives the training loop needs; one object per process group."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def max_(self, t):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def mean(self, t):
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world

    def any(self, flag) -> bool:
        t = torch.tensor([float(bool(flag))], device=self.device)
        return bool(self.max_(t).item())

    def average_grads(self, params):
        """One all-reduce for all quantizer gradients (a few thousand floats)."""
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat)
        flat /= self.world
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))

    def broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup(device: str):
    """Under torchrun: join the process group (NCCL on GPUs, gloo on CPUs) and return (Comm, this rank's
    device); otherwise (None, device). Ranks other than 0 print nothing."""
    if "RANK" not in os.environ:
        return None, device
    gpu = device.startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if gpu and local >= torch.cuda.device_count():
        raise ValueError(f"torchrun started process {local} on this machine, which has {torch.cuda.device_count()} "
                         f"GPU(s): one process per GPU (--nproc-per-node), or --device cpu")
    if gpu:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if gpu else "gloo", device_id=torch.device("cuda", local) if gpu else None)
    comm = Comm()
    comm.device = f"cuda:{local}" if gpu else "cpu"
    if comm.rank:
        sys.stdout = open(os.devnull, "w")
    return comm, comm.device


def shard(model, device):
    """fully_shard each block, then the root; materialise this rank's (uninitialised) shards."""
    from torch.distributed.fsdp import fully_shard
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device=device)
    model.init_rope(device)
    return model.eval().requires_grad_(False)


def fill_from_rank0(model, full_state):
    """Every rank's shards from rank 0's full state dict (the other ranks pass None)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, full_state or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def load(a, comm, device, prepare):
    """The distributed counterpart of train.prepare: rank 0 loads on the CPU and makes the windows; every
    rank gets a sharded model and the same windows. Returns (model, train, calib, held, fingerprint)."""
    import sasq
    if comm.rank == 0:
        cpu, train, calib, held = prepare(a, "cpu")
        meta = (cpu.args, train, calib, held, sasq.fingerprint(cpu))
        full = cpu.state_dict()
    meta = comm.broadcast(meta if comm.rank == 0 else None)
    args, train, calib, held, fp = meta
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    with torch.device("meta"):
        model = llama.Transformer(args).to(dtype)
    model.checkpointing = a.checkpointing
    shard(model, device)
    fill_from_rank0(model, full if comm.rank == 0 else None)
    import resource                                       # Linux: ru_maxrss in KiB
    print(f"rank {comm.rank}: peak host memory after loading {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB",
          file=sys.stderr)
    return model, train, calib, held, fp


# --------------------------------------------------------------------------- speed and memory at 13B / 70B

SHAPES = {"tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=256), "7b": dict(), "13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824),
          "70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672)}


def bench(argv=None):
    """Train SASQ scales for a few steps on a LLaMA-2 shape with random weights, built sharded (no rank ever
    holds the whole model): seconds per step, tokens/s, MFU (6N per token over the N decoder linear
    weights; attention and the head not counted) and peak memory per GPU."""
    import sasq
    import train
    p = argparse.ArgumentParser(description=bench.__doc__)
    p.add_argument("--shape", choices=SHAPES, default="13b")
    p.add_argument("--batch-size", type=int, default=1, help="windows per GPU")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6, help="timed steps after 2 warm-up steps")
    p.add_argument("--header", action="store_true", help="print the table header first")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of one GPU")
    a = p.parse_args(argv)
    import cli
    cli.check_args(p, a)
    comm, device = setup("cuda" if torch.cuda.is_available() else "cpu")
    if a.header:
        print("| shape | GPUs | batch per GPU | checkpointing | s/step | tokens/s | MFU | peak GiB per GPU |\n|---|---|---|---|---|---|---|---|")
    world = comm.world if comm else 1
    args = llama.ModelArgs(**SHAPES[a.shape])
    with torch.device("meta"):
        model = llama.Transformer(args).to(torch.bfloat16)
    model.checkpointing = a.checkpointing
    if comm:
        shard(model, device)
    else:
        model.to_empty(device=device).init_rope(device)
        model.requires_grad_(False)
    with torch.no_grad():
        for name, prm in model.named_parameters():    # random weights on each shard (only shapes matter)
            local = prm.to_local() if hasattr(prm, "to_local") else prm
            local.fill_(1.0) if name.endswith("norm.weight") else local.normal_(0, 0.02)
    qs = sasq.attach(model, sasq.QuantConfig())
    wins = torch.randint(args.vocab_size, (64, a.seq_len + 1))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    train.train_scales(model, qs, wins, 2, a.batch_size, 2e-2, device=device, progress=False, comm=comm)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    train.train_scales(model, qs, wins, a.steps, a.batch_size, 2e-2, device=device, progress=False, comm=comm)
    sync()
    sec = (time.perf_counter() - t0) / a.steps
    hd = args.dim // args.n_heads       # decoder linear weights per layer: q, o; k, v; w1, w2, w3
    n = args.n_layers * (2 * args.dim * args.n_heads * hd + 2 * args.dim * args.n_kv_heads * hd + 3 * args.dim * args.hidden_dim)
    tokens = world * a.batch_size * a.seq_len
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    mfu = tokens / sec * 6 * n / (world * a.peak_tflops * 1e12)
    print(f"| {a.shape} | {world} | {a.batch_size} | {int(a.checkpointing)} | {sec:.3f} | {tokens / sec:,.0f} | "
          f"{mfu:.2f} | {peak:.1f} |")
    if comm:
        dist.destroy_process_group()


if __name__ == "__main__":
    bench()

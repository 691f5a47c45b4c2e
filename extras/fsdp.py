"""SASQ on several GPUs: train.py's recipe under torchrun, the frozen weights sharded by FSDP2. The options
are train.py's (`python -m extras.fsdp --help` lists them).

    torchrun --nproc-per-node 2 -m extras.fsdp --ckpt llama-2-13b --checkpointing      # one node, 2 GPUs
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m extras.fsdp ...
    torchrun --nproc-per-node 4 -m extras.bench_train --shape 70b --checkpointing      # speed/memory, random weights

What changes against one process, and why it stays the same method:
  1. Loading: rank 0 reads the checkpoint into host memory (one copy per node, not one per rank) and cuts
     the texts into windows; every rank builds the model on the meta device, `fully_shard`s each decoder
     block and then the root, and rank 0's weights are broadcast into the shards. The self-written text
     (self:N) is written by the sharded model, each rank a share with its own seed (self_windows), so a
     13B or 70B model writes it on its GPUs; with one process it is train.py's text.
  2. The quantizers are attached after sharding, so FSDP never sees them: their few parameters are
     ordinary tensors, identical on every rank, and their gradients are averaged by one all-reduce per
     step. Adam then takes the same step everywhere, so they stay identical.
  3. Batches: each global batch of world x --batch-size windows is drawn by the same generator as one
     process would draw it; rank r takes its r-th slice. Averaging the gradients gives the gradient of
     the global batch's mean loss (every slice has the same number of tokens).
  4. Calibration: each rank observes its slice of every calibration batch; an all-reduce MAX of the
     per-batch absmax rows gives exactly the rows one process computes, so max and mean inits agree.
  5. Rank 0 alone prints and writes (scales, state, logs); every rank reads the state on --resume.
With world size 1 each of these is the identity: train.py's single-process code path, which this file
uses (train.calibration and train.recipe take a `comm` or a source, cli.Harness the loop's; they never
import this file).
"""
import os
import sys

import torch
import torch.distributed as dist

import checkpoints
import cli
import data
import model as llama
import sasq
import train


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

    def calibrate(self, model, quantizers, wins, batch_size, method, trunc_mult, progress=True, alpha=None):
        """sasq.calibrate over world x batch_size windows a batch: each rank observes its slice of every
        batch (a trailing partial batch is dropped), and a MAX all-reduce of the per-batch rows gives the
        rows one process records, so the init is exactly one process's."""
        step = batch_size * self.world
        mine = [wins[i + self.rank * batch_size:][:batch_size] for i in range(0, len(wins) - len(wins) % step, step)]
        stats = sasq.observe(model, torch.cat(mine), batch_size, progress)
        for s in stats:
            for rows in s.values():
                self.max_(rows)
        sasq.init_scales(quantizers, stats, method, trunc_mult)

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
    """fully_shard each block, then the root, over a mesh of this device's type (FSDP2's default mesh is
    CUDA whenever a GPU is visible, which breaks --device cpu on a GPU machine); materialise this rank's
    (uninitialised) shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    model.init_rope(device)
    return model.eval().requires_grad_(False)


def fill_from_rank0(model, full_state):
    """Every rank's shards from rank 0's full state dict (the other ranks pass None)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, full_state or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def self_windows(model, bos_id, openings, spec, a, comm):
    """A self:N source written by the sharded model: every rank writes an equal share (the same number of
    decode steps, so that FSDP's gathers pair up; the batch is the smallest any rank's memory allows), with
    its own seed (rank 0: --seed, so one process writes train.py's text), gathered in rank order."""
    n = data.parse_self(spec)
    share = -(-n // comm.world)
    batch = -comm.max_(torch.tensor([-data.sampler_batch(model, a.seq_len)], device=comm.device)).item()
    mine = data.sample(model, share, a.seq_len, a.seed + 7919 * comm.rank, batch=int(batch), bos_id=bos_id,
                       progress=comm.rank == 0, graph=False, openings=openings,
                       first=share * comm.rank).to(comm.device)
    every = [torch.empty_like(mine) for _ in range(comm.world)]
    dist.all_gather(every, mine)
    return torch.cat(every)[:n].cpu()


def load(a, comm, device):
    """The distributed counterpart of train.prepare: rank 0 reads the checkpoint on the CPU and cuts the
    texts into windows; every rank gets a sharded model, the texts' windows and the self-written ones
    (written by the sharded model on the GPUs). Returns (model, train, calib, held, fingerprint)."""
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    if comm.rank == 0:
        cpu, tok = checkpoints.load_model(a.ckpt, "cpu", dtype)
        data.check_seq_len(cpu, a.seq_len)
        texts = {s: data.token_windows(tok, s, a.seq_len) for s in a.calib if not data.is_self(s)}
        openings = {s: data.opening_ids(tok, data.self_openings(s)) for s in a.calib if data.is_self(s)}
        meta = (cpu.args, texts, tok.bos_id if tok.add_bos else None, openings, checkpoints.fingerprint(cpu))
        full = cpu.state_dict()
    meta = comm.broadcast(meta if comm.rank == 0 else None)
    args, texts, bos_id, openings, fp = meta
    with torch.device("meta"):
        model = llama.Transformer(args).to(dtype)
    model.checkpointing = a.checkpointing
    shard(model, device)
    fill_from_rank0(model, full if comm.rank == 0 else None)
    import resource                                       # Linux: ru_maxrss in KiB
    print(f"rank {comm.rank}: peak host memory after loading {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB",
          file=sys.stderr)
    wins = train.calibration(a, lambda s: self_windows(model, bos_id, openings[s], s, a, comm) if data.is_self(s) else texts[s])
    return (model, *wins, fp)


def main(argv=None):
    a = train.parse_args(argv)
    if "RANK" not in os.environ:
        raise ValueError("extras.fsdp runs under torchrun (torchrun --nproc-per-node N -m extras.fsdp "
                         "...); one process: train.py")
    if a.rotate or a.kv_bits or train.quant_config(a).smooth is not None:   # a usage error, from rank 0
        if os.environ.get("RANK", "0") == "0":
            print("extras.fsdp: error: --rotate, --kv-bits, --fp8 and --alpha (sasq.smooth reads whole weights) "
                  "are not supported under torchrun yet; use one GPU (train.py)", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(a.seed)
    comm, a.device = setup(a.device)
    try:
        model, train_wins, calib_wins, held, fingerprint = load(a, comm, a.device)
        print(f"{comm.world} processes, FSDP2: global batch {comm.world} x {a.batch_size} windows")
        train.recipe(a, model, train_wins, calib_wins, held, fingerprint, comm)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    cli.run_main(main)

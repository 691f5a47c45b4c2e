"""See the outliers that make static quantization hard, and what SASQ's truncation and clipping do
to them.

    python plot_activations.py                                      # PTQ-initialised thresholds,
    CPU, ~1 min python plot_activations.py --ckpt llama-2-7b --scales scales.safetensors --device
    cuda

For each chosen layer and quantization point: a histogram of activation values (log counts) before
and after truncation + clipping, with the clip thresholds drawn, and the per-channel absmax
(channels on x). One summary across depth: max |x| and the 99.9th percentile per layer, before and
after. "Before" is the quantizer's input x; "after" is what the integer GEMM sees, s *
round(trunc(x) / s).
"""
import argparse
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import checkpoints
import cli  # noqa: E402
import data  # noqa: E402
import sasq  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help=f"checkpoint (default: {checkpoints.DEFAULT_CKPT})")
    p.add_argument("--scales", default=None, help="trained scales from train.py (default: PTQ init "
                                                  "only)")
    p.add_argument("--text", default=data.TEST, help="text whose activations are shown (default "
                                                     "%(default)s)")
    p.add_argument("--calib", default=data.CALIB, help="PTQ calibration text when --scales is not "
                                                       "given")
    p.add_argument("--windows", type=int, default=2, help="windows of --text whose activations are "
                                                          "shown (default 2)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--layers", default=None, help="comma-separated layer indices (default: four "
                                                  "across depth)")
    p.add_argument("--points", default=",".join(sasq.POINTS), help="subset of %(default)s")
    p.add_argument("--out", default="plots", help="folder for the PNGs")
    p.add_argument("--force", action="store_true", help="replace plots that exist in --out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when a GPU is visible)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    a = p.parse_args(argv)
    cli.check_args(p, a)

    def error(msg):
        p.exit(2, f"{p.prog}: error: {msg}\n")
    try:                         # everything checkable is checked before the model loads
        a.layers = sorted({int(v) for v in a.layers.split(",")}) if a.layers else None
    except ValueError:
        error(f"--layers {a.layers}: write layer indices separated by commas, e.g. 0,10,29")
    if any(pt not in sasq.POINTS for pt in a.points.split(",") if pt) or not a.points.strip(","):
        error(f"--points must be a subset of {','.join(sasq.POINTS)}")
    if a.scales and checkpoints.read_scales_config(a.scales).rotate is not None:
        error(f"--scales {a.scales}: scales of a rotated model (train.py --rotate) are not "
              "supported here")
    if os.path.isfile(a.out):
        error(f"--out {a.out} is a file; give a folder")
    old = [n for n in (os.listdir(a.out) if os.path.isdir(a.out) else []) if n.endswith(".png")]
    if old and not a.force:
        error(f"--out {a.out} already holds plots ({old[0]}, ...); pass --force to replace them")
    parent = os.path.dirname(os.path.abspath(a.out))
    if not os.path.isdir(a.out) and not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
        error(f"--out {a.out}: cannot create it in {parent}")
    return a


# --------------------------------------------------------------------------- capture and statistics

def capture(model, quantizers, wins, keep, device="cpu"):
    """Run the quantized model over `wins`. Returns ({(layer, point): x (tokens, channels)} for
    layers in `keep`, and per-window depth statistics
    {(layer, point): [(max|x|, p99.9|x|, max|x^|, p99.9|x^|)]}).
    """
    acts, depth, seen, hooks = {}, {}, set(), []
    for i, qs in enumerate(quantizers):
        for point, q in qs.items():
            def hook(mod, args, key=(i, point)):
                # a shared point fires once per reading linear: keep one copy
                if key in seen:
                    return
                seen.add(key)
                x = args[0].detach().flatten(0, -2).float()
                if key[0] in keep:
                    acts.setdefault(key, []).append(x.cpu())
                xa = after(mod, x)
                stats = (x.abs().max().item(), p999(x), xa.abs().max().item(), p999(xa))
                depth.setdefault(key, []).append(stats)
            hooks.append(q.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for w in wins:
                seen.clear()
                model(w[None].to(device))
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in acts.items()}, depth


def p999(x):
    """99.9th percentile of |x| (kthvalue: torch.quantile refuses tensors over 16M elements)."""
    flat = x.abs().flatten()
    return flat.kthvalue(max(1, int(0.999 * flat.numel()))).values.item()


def after(q, x):
    """What the integer GEMM sees, in float: s * codes, codes = clamp(round(trunc(x) / s))."""
    with torch.no_grad():
        # .forward: do not re-enter the capture hook
        codes, s = q.forward(x.to(q.log_scale.device))
        return codes * s


def point_stats(q, x):
    """Fraction of values on the clip (codes at the grid's ends) and the drop of max |x|."""
    with torch.no_grad():
        t = q.truncate(x.to(q.log_scale.device)) / q.scale()
        clipped = ((t > sasq.qmax(q.bits)) | (t < -sasq.qmax(q.bits) - 1)).float().mean().item()
    xa = after(q, x).cpu()
    return {
        "clipped": clipped,
        "max_before": x.abs().max().item(),
        "max_after": xa.abs().max().item(),
        "max_reduction": 1 - xa.abs().max().item() / x.abs().max().item(),
    }


# --------------------------------------------------------------------------- figures

def thresholds(q):
    """Per-channel clip threshold qmax * s (broadcast to channels), and the truncation c if any."""
    clip = (sasq.qmax(q.bits) * q.scale()).detach().float().cpu()
    c = q.log_c.exp().detach().float().cpu() if q.log_c is not None else None
    return clip, c


def plot_point(path, title, q, x):
    xa = after(q, x).cpu()
    clip, c = thresholds(q)
    fig, (h, ch) = plt.subplots(1, 2, figsize=(12, 4))
    lim = x.abs().max().item()
    bins = torch.linspace(-lim, lim, 201).numpy()
    h.hist(x.flatten().numpy(), bins=bins, alpha=0.6, label="before (fp input)")
    h.hist(xa.flatten().numpy(), bins=bins, alpha=0.6, label="after (truncate + clip + round)")
    for v, style in ((clip.max().item(), "--"), (clip.median().item(), ":")):
        h.axvline(v, color="k", ls=style)
        h.axvline(-v, color="k", ls=style)
    h.set_yscale("log")
    h.set(title=f"{title}: values (dashed: max clip, dotted: median clip)", xlabel="activation",
          ylabel="count")
    h.legend(fontsize=8)
    n = x.shape[1]
    ch.plot(x.abs().amax(0).numpy(), lw=0.8, label="absmax before")
    ch.plot(xa.abs().amax(0).numpy(), lw=0.8, label="absmax after")
    ch.plot(clip.expand(n).numpy(), "k--", lw=0.6, label="clip qmax*s")
    if c is not None:
        ch.plot(c.numpy(), "r:", lw=0.6, label="truncation c")
    ch.set_yscale("log")
    ch.set(title=f"{title}: per-channel absmax", xlabel="channel", ylabel="|x|")
    ch.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def depth_stats(depth, point):
    """Per layer: max |x| (max over windows), p99.9 (mean over windows), the same after; (layers,
    (n, 4))."""
    layers = sorted(i for i, p in depth if p == point)

    def row(rs):            # the per-window rows of one layer
        return [max(r[0] for r in rs), sum(r[1] for r in rs) / len(rs),
                max(r[2] for r in rs), sum(r[3] for r in rs) / len(rs)]
    return layers, torch.tensor([row(depth[i, point]) for i in layers])


def print_spikes(depth, points, top=2):
    """The layers where max |x| is largest, against the bulk (p99.9): what the depth figure shows,
    in numbers."""
    print(f"\n{'point':>5} {'layer':>5} {'max|x|':>9} {'p99.9':>9} {'ratio':>8}   (the {top} "
          "largest max |x| across depth)")
    for point in points:
        layers, st = depth_stats(depth, point)
        for j in st[:, 0].argsort(descending=True)[:top].tolist():
            print(f"{point:>5} {layers[j]:>5} {st[j, 0]:>9.1f} {st[j, 1]:>9.2f} "
                  f"{st[j, 0] / st[j, 1]:>7.0f}x")


def plot_depth(path, depth, points, label):
    fig, axes = plt.subplots(1, len(points), figsize=(4 * len(points), 3.5), squeeze=False)
    for ax, point in zip(axes[0], points):
        layers, stats = depth_stats(depth, point)
        for col, name, style in ((0, "max |x| fp", "C0-"), (1, "p99.9 fp", "C0:"),
                                 (2, f"max |x| {label}", "C1-"), (3, f"p99.9 {label}", "C1:")):
            ax.plot(layers, stats[:, col].numpy(), style, label=name)
        ax.set_yscale("log")
        ax.set(title=point, xlabel="layer")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main

def main(argv=None):
    a = parse_args(argv)
    points = [p for p in a.points.split(",") if p]
    model, tok = checkpoints.load_model(a.ckpt, a.device)
    data.check_seq_len(model, a.seq_len)
    n = model.args.n_layers
    layers = a.layers or sorted({0, n // 3, 2 * n // 3, n - 1})
    if any(not 0 <= i < n for i in layers):
        raise SystemExit(f"error: --layers must be in 0..{n - 1}")
    if a.scales:
        quantizers, _ = checkpoints.load_scales(a.scales, model)
        label = "SASQ"
    else:
        quantizers = sasq.attach(model, sasq.QuantConfig())
        calib = data.token_windows(tok, a.calib, a.seq_len, 8)
        sasq.calibrate(model, quantizers, calib, batch_size=4)
        label = "PTQ init"
    wins = data.token_windows(tok, a.text, a.seq_len, a.windows)
    acts, depth = capture(model, quantizers, wins, set(layers), a.device)
    os.makedirs(a.out, exist_ok=True)
    paths, stats = [], {}
    print(f"{'layer':>5} {'point':>5} {'clipped':>9} {'max|x|':>9} {'after':>9} {'max drop':>9}")
    for i in layers:
        for point in points:
            q, x = quantizers[i][point], acts[i, point]
            st = stats[i, point] = point_stats(q, x)
            print(f"{i:>5} {point:>5} {st['clipped']:>9.3%} {st['max_before']:>9.2f} "
                  f"{st['max_after']:>9.2f} "
                  f"{st['max_reduction']:>9.1%}")
            paths.append(os.path.join(a.out, f"layer{i:02d}_{point}.png"))
            plot_point(paths[-1], f"layer {i} {point} ({label})", q, x)
    print_spikes(depth, points)
    paths.append(os.path.join(a.out, "depth.png"))
    plot_depth(paths[-1], depth, points, label)
    print("\n".join(["wrote:", *paths]))
    return stats, acts, quantizers, paths


if __name__ == "__main__":
    cli.run_main(main)

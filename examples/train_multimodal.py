"""Train a small multi-modal encoder with sdm_triton, the way "the seed" (a user's write-up of a failed SDM training run, see docs/contract.md) meant its run to work.

Synthetic data: every identity has a latent vector; a sample of it draws a variation of
that vector and shows it through three "views" (RGB, infrared, text), each a fixed
random linear map of the latent plus noise. A fraction of the views of every sample is
missing, replaced by a null token and marked absent in a mask (the seed's v2 fix: absent
modalities must not take part in alignment).

Per step, as in the seed and ReID5o: the SDM loss of every modality against the RGB anchor
(one ``sdm_loss_multi`` call for both galleries, with masks, the "seed" preset: forward
KL, tau 0.2, mean of the two directions), averaged, plus the feature-norm band penalty on
every modality. A robust spike detector watches the loss and skips the optimizer step on
a spike. The SDM statistics (``return_stats=True``, one per gallery) give the mean
probability on true matches.

    python examples/train_multimodal.py                    # CPU: a few seconds
    python examples/train_multimodal.py --corrupt-step 120 # shuffle one batch's ids: a spike
    python examples/train_multimodal.py --ignore-masks     # the seed's bug: null tokens align too
    python examples/train_multimodal.py --device cuda --amp
    python examples/train_multimodal.py --readme-plot      # redraw the README's figure

Writes a plot of the loss and the positive probability against the step, when matplotlib
is installed: ``train_multimodal.png`` in the current directory by default, ``--out PATH``
elsewhere, ``--readme-plot`` over the figure next to this script that the README shows,
``--no-plot`` not at all. Without matplotlib the run completes and says that no plot was
written.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time
from typing import Optional, Sequence

import torch
import torch.nn as nn

from sdm_triton import sdm_loss_multi
from sdm_triton.presets import preset_kwargs
from sdm_triton.stability import SpikeDetector, check_finite, feature_norm_penalty

MODALITIES = ("rgb", "ir", "text")
#: The figure the README shows; written only with --readme-plot.
README_PLOT = pathlib.Path(__file__).resolve().with_suffix(".png")
DEFAULT_PLOT = "train_multimodal.png"   # relative: in the current directory
VIEW_DIMS = {"rgb": 48, "ir": 32, "text": 40}


class SyntheticIdentities:
    """Identities as latent vectors; views through fixed random linear maps plus noise."""

    def __init__(self, n_ids: int, latent_dim: int = 16, spread: float = 0.5, noise: float = 0.3,
                 missing: float = 0.3, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.centers = torch.randn(n_ids, latent_dim, generator=gen)
        self.maps = {m: torch.randn(latent_dim, d, generator=gen) / math.sqrt(latent_dim)
                     for m, d in VIEW_DIMS.items()}
        self.null_tokens = {m: torch.full((d,), 3.0) for m, d in VIEW_DIMS.items()}
        self.spread, self.noise, self.missing = spread, noise, missing

    def sample(self, ids: torch.Tensor, gen: torch.Generator, missing: Optional[float] = None):
        """Views ``{m: [B, d_m]}`` and presence masks ``{m: [B] bool}`` of samples of ``ids``."""
        missing = self.missing if missing is None else missing
        z = self.centers[ids] + self.spread * torch.randn(len(ids), self.centers.shape[1], generator=gen)
        views, present = {}, {}
        for m in MODALITIES:
            x = z @ self.maps[m] + self.noise * torch.randn(len(ids), VIEW_DIMS[m], generator=gen)
            keep = torch.rand(len(ids), generator=gen) >= missing
            views[m] = torch.where(keep[:, None], x, self.null_tokens[m])
            present[m] = keep
        return views, present


def make_encoders(embed_dim: int, hidden: int, seed: int) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict({
        m: nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        for m, d in VIEW_DIMS.items()
    })


@torch.no_grad()
def recall_at_1(encoders, data: SyntheticIdentities, ids: torch.Tensor, gen, device) -> dict:
    """R@1 of IR and text queries against an RGB gallery of other samples of the same identities."""
    gallery, _ = data.sample(ids, gen, missing=0.0)
    queries, _ = data.sample(ids, gen, missing=0.0)
    g = nn.functional.normalize(encoders["rgb"](gallery["rgb"].to(device)), dim=1)
    out = {}
    for m in ("ir", "text"):
        q = nn.functional.normalize(encoders[m](queries[m].to(device)), dim=1)
        best = (q @ g.T).argmax(dim=1).cpu()
        out[m] = float((ids[best] == ids).float().mean())
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    plot = p.add_mutually_exclusive_group()
    plot.add_argument("--out", default=DEFAULT_PLOT, help="where to write the plot")
    plot.add_argument("--readme-plot", action="store_true",
                      help=f"write the plot over the README's figure, {README_PLOT.name} next to this script")
    plot.add_argument("--no-plot", action="store_true", help="do not write a plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ids-per-batch", type=int, default=16)
    p.add_argument("--samples-per-id", type=int, default=4)
    p.add_argument("--missing", type=float, default=0.3, help="fraction of views missing per modality")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--penalty-weight", type=float, default=5e-3, help="feature-norm band penalty weight")
    p.add_argument("--corrupt-step", type=int, default=None,
                   help="shuffle the identity labels of this step's batch, to show the spike detector")
    p.add_argument("--ignore-masks", action="store_true",
                   help="the seed's original bug: null tokens of missing views take part in the SDM loss")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the encoders (the loss stays fp32)")
    p.add_argument("--check-finite", action="store_true", help="check features for NaN/Inf every step (syncs)")
    p.add_argument("--log-every", type=int, default=1, help="print every N steps (0: only the summary)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default on CPU: 1; the model is tiny and thread hand-offs "
                        "cost more than they save)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    # args.plot_path: where the plot goes, or None for no plot
    args.plot_path = None if args.no_plot else str(README_PLOT) if args.readme_plot else args.out
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(args, device)
    finally:
        torch.set_num_threads(previous_threads)


def _train(args: argparse.Namespace, device: torch.device) -> dict:
    start = time.perf_counter()

    n_train_ids, n_eval_ids = 200, 100
    data = SyntheticIdentities(n_train_ids + n_eval_ids, missing=args.missing, seed=args.seed)
    eval_ids = torch.arange(n_train_ids, n_train_ids + n_eval_ids)
    gen = torch.Generator().manual_seed(args.seed + 1)
    encoders = make_encoders(embed_dim=32, hidden=64, seed=args.seed).to(device)
    opt = torch.optim.Adam(encoders.parameters(), lr=args.lr)
    detector = SpikeDetector()
    sdm_options = preset_kwargs("seed", backend=args.backend)
    r1_before = recall_at_1(encoders, data, eval_ids, torch.Generator().manual_seed(7), device)

    history = {"loss": [], "sdm": [], "penalty": [], "pos_prob": [], "feat_norm": [], "spike": []}
    for step in range(1, args.steps + 1):
        ids = torch.randperm(n_train_ids, generator=gen)[: args.ids_per_batch].repeat_interleave(args.samples_per_id)
        views, present = data.sample(ids, gen)
        if step == args.corrupt_step:
            ids = ids[torch.randperm(len(ids), generator=gen)]      # a corrupted batch: wrong labels
        ids = ids.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            feats = {m: encoders[m](views[m].to(device)) for m in MODALITIES}
        masks = {m: present[m].to(device) for m in MODALITIES}
        sdm_masks = {m: None if args.ignore_masks else masks[m] for m in MODALITIES}
        if args.check_finite:
            check_finite(*feats.values(), names=[f"{m} features" for m in MODALITIES])

        galleries = ("ir", "text")                                    # every modality against the RGB anchor
        sdm_terms, stats = sdm_loss_multi(feats["rgb"], [feats[m] for m in galleries], ids, ids,
                                          q_mask=sdm_masks["rgb"], g_mask=[sdm_masks[m] for m in galleries],
                                          return_stats=True, **sdm_options)   # [2] losses, [2] statistics
        pos_probs = 0.5 * (stats.pos_prob_q2g + stats.pos_prob_g2q)
        sdm = sdm_terms.mean()
        penalty = torch.stack([feature_norm_penalty(feats[m], weight=args.penalty_weight, mask=masks[m])
                               for m in MODALITIES]).mean()
        loss = sdm + penalty

        loss_value = float(loss.detach())
        spike = detector.update(loss_value)
        opt.zero_grad(set_to_none=True)
        if not spike:                                                 # a spike: skip this update
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoders.parameters(), max_norm=5.0)
            opt.step()

        feat_norm = float(torch.linalg.vector_norm(feats["rgb"].detach().float(), dim=1)[masks["rgb"]].mean())
        for key, value in (("loss", loss_value), ("sdm", float(sdm.detach())), ("penalty", float(penalty.detach())),
                           ("pos_prob", float(pos_probs.mean())), ("feat_norm", feat_norm),
                           ("spike", spike)):
            history[key].append(value)
        if args.log_every and (step % args.log_every == 0 or spike or step == args.steps):
            print(f"step {step:4d}/{args.steps}  loss {loss_value:.4f}  sdm {history['sdm'][-1]:.4f}  "
                  f"penalty {history['penalty'][-1]:.4f}  pos_prob {history['pos_prob'][-1]:.3f}  "
                  f"|f_rgb| {feat_norm:.2f}" + ("  SPIKE: step skipped" if spike else ""), flush=True)

    r1_after = recall_at_1(encoders, data, eval_ids, torch.Generator().manual_seed(7), device)
    head = min(5, args.steps)
    spike_steps = [i + 1 for i, s in enumerate(history["spike"]) if s]
    metrics = {
        "steps": args.steps,
        "first_loss": sum(history["sdm"][:head]) / head,
        "final_loss": sum(history["sdm"][-head:]) / head,
        "final_pos_prob": sum(history["pos_prob"][-head:]) / head,
        "final_feat_norm": history["feat_norm"][-1],
        "feature_dtype": str(feats["rgb"].dtype).replace("torch.", ""),
        "spikes": detector.spikes,
        "spike_steps": spike_steps,
        "optimizer_steps": int(opt.state[next(encoders.parameters())].get("step", 0)),   # Adam's own count
        "r1_before": r1_before,
        "r1_after": r1_after,
        "history": history,
        "plot": _plot(history, spike_steps, args.plot_path) if args.plot_path else None,
        "seconds": time.perf_counter() - start,
    }
    print(f"done in {metrics['seconds']:.1f}s: SDM {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f}, "
          f"positive probability {metrics['final_pos_prob']:.3f}, spikes at {spike_steps or 'none'}, "
          f"R@1 IR->RGB {r1_before['ir']:.2f} -> {r1_after['ir']:.2f}, "
          f"text->RGB {r1_before['text']:.2f} -> {r1_after['text']:.2f}; "
          + (f"plot: {metrics['plot']}" if metrics["plot"] else "no plot written" if not args.plot_path
             else "no plot written: matplotlib is not installed (pip install matplotlib)"))
    return metrics


def _plot(history: dict, spike_steps: list, path: str) -> Optional[str]:
    """Write the plot to ``path`` and return it; None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(history["loss"]) + 1)
    fig, (ax_loss, ax_prob) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax_loss.plot(steps, history["loss"], label="total")
    ax_loss.plot(steps, history["sdm"], label="SDM (mean over RGB-IR, RGB-text)")
    ax_loss.plot(steps, history["penalty"], label="feature-norm penalty")
    if spike_steps:
        ax_loss.scatter(spike_steps, [history["loss"][s - 1] for s in spike_steps], color="red", zorder=3,
                        label="spike (update skipped)")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="best", fontsize="small")
    ax_prob.plot(steps, history["pos_prob"], color="tab:green")
    ax_prob.set_ylabel("mean probability on true matches")
    ax_prob.set_xlabel("step")
    ax_prob.set_ylim(0, 1)
    fig.suptitle("SDM training on synthetic RGB / IR / text views with missing modalities")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()

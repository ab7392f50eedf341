"""
What the hint does, as one picture: `python sample.py --explain` writes it beside the result.

A module of its own so that sample.py reads as the pipeline it runs (read, load, prepare, generate, write): the
picture is work of its own, sampling up to three models from the same noise and reading the fusion layer's output
with a forward hook.
"""
import torch
from PIL import Image, ImageDraw

from checkpoint import CheckpointError
from data import to_pil
from dtc import generate, load_for_sampling
from vae import LATENT_SCALE


@torch.no_grad()
def explain(model, frozen, source, mask, reference, hint, target, args, dtype, device, tile=128):
    """The picture of what the hint does (a PIL image), every result from the same seed and noise:
    row 1: reference | hint | baseline (no hint branch) | DTC | DTC with its hint zeroed | target (if given);
    row 2: DTC's x0 estimate (decoded) at 4 of the denoising steps | how strongly the fusion changes the finest
    skip at the middle step: FiLM's mean |gamma| and mean |beta| over channels (add, xattn: mean |change|),
    each map scaled to its own maximum, which is printed on it. The maps are the first fusion layer's outputs, taken
    by a forward hook while DTC samples: what the model computed, not a recomputation."""
    if not model.cfg.hint:
        raise CheckpointError(f"{args.dtc}: --explain shows what the hint does, and this model has no hint branch")

    def sample(m, fr, **kw):  # pasted back as it is
        x = generate(m, fr, source, mask, reference, torch.Generator().manual_seed(args.seed), args.steps,
                     args.guidance, args.eta, args.sampler, hint, progress=False, **kw)
        return x * (1 - mask) + source * mask

    trace, fusion_outputs = [], []
    hook = model.fusion[0].register_forward_hook(lambda layer, inputs, out: fusion_outputs.append(out[-1:]))
    dtc = sample(model, frozen, trace=trace)  # (the last of each batch [null, conditional] is the conditional branch)
    hook.remove()
    row1 = [("reference", reference), ("hint", hint * 2 - 1)]
    if args.baseline:
        base_model, base_frozen = load_for_sampling(args.baseline, args.sd, args.dinov2, dtype, device)
        if base_model.cfg.hint:
            raise CheckpointError(f"{args.baseline} (--baseline): has a hint branch; the baseline shows a model "
                                  "without one (train.py --no_hint)")
        row1.append(("baseline", sample(base_model, base_frozen)))
    row1 += [("DTC", dtc), ("DTC, hint zeroed", sample(model, frozen, zero_hint=True))]
    row1 += [("target", target)] if target is not None else []
    picks = sorted({round(k * (len(trace) - 1) / 3) for k in range(4)})
    row2 = [(f"x0 at t={trace[k][0]}", frozen.vae.decode(trace[k][2] / LATENT_SCALE).float().clamp(-1, 1)) for k in picks]
    out = fusion_outputs[len(trace) // 2]  # at the middle step
    maps = ([("mean |gamma|", out.chunk(2, 1)[0]), ("mean |beta|", out.chunk(2, 1)[1])] if model.cfg.fusion == "film"
            else [("mean |change|", out)])
    for name, m in maps:
        m = m.abs().mean(1, keepdim=True)
        peak = m.max().item()
        row2.append((f"{name} <= {peak:.3g}", (m / max(peak, 1e-12)).expand(-1, 3, -1, -1) * 2 - 1))
    image = Image.new("RGB", (max(len(row1), len(row2)) * tile, 2 * (tile + 14)), "white")
    draw = ImageDraw.Draw(image)
    for r, row in enumerate((row1, row2)):
        for c, (label, x) in enumerate(row):
            im = to_pil(x[0].float().cpu()).resize((tile, tile), Image.NEAREST if x.shape[-1] < tile else Image.BICUBIC)
            image.paste(im, (c * tile, r * (tile + 14) + 14))
            draw.text((c * tile + 2, r * (tile + 14) + 1), label, fill="black")
    return image

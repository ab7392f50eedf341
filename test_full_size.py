"""
The full-size dry run: one sd15 training step and two guided DDIM steps at SD 1.5's widths, on fake tensors (shapes and
dtypes, no storage: no weights, no GPU, no downloads), so that a shape or dtype error at full size fails on a CPU.
Apart from test_dtc.py because it takes about 24 minutes on a loaded 2-core CPU, longer than the whole rest of the
suite: run it after a change to a module's shapes or dtypes, or to train.dtc_step, dtc.prepare or dtc.generate.

    python -m pytest -q test_full_size.py
"""
import torch

import bench, dtc, train
from dinov2 import DINOv2, PRESETS
from dtc import DiffuseToChoose, VGGLoss
from vae import AutoencoderKL, VAEConfig

torch.set_num_threads(1)  # as in test_dtc.py: on a shared 2-core machine, OpenMP threads wait on each other


def test_train_sd15_full_size_dry_run(monkeypatch):
    """One sd15 training step at SD widths on fake tensors (shapes and dtypes, no storage: no weights, no GPU, no
    downloads) through train.py's dtc_step: DINOv2 g/14 and the VAE frozen in bfloat16, the main U-Net, hint encoder,
    FiLM and VGG loss under bfloat16 autocast over float32 weights, clipping and AdamW; as the paper trains, then
    as the one-GPU recipe with gradient checkpointing. Then dtc.generate with two guided DDIM steps. A shape or
    dtype error at full size fails here. make_hint searches the mask's values, which fake tensors do not have: a
    canvas of its shape stands in."""
    monkeypatch.setattr(dtc, "make_hint", lambda reference, mask: torch.rand(len(mask), 3, *mask.shape[2:]))
    args = train.parse_args(["--preset=sd15"])
    with torch.device("meta"):
        model, vgg = DiffuseToChoose(dtc.DTCConfig()), VGGLoss()
        frozen = dtc.Frozen(AutoencoderKL(VAEConfig()).to(torch.bfloat16).requires_grad_(False).eval(),
                            DINOv2(PRESETS["vitg14"]).to(torch.bfloat16).requires_grad_(False).eval())
    cpu, autocast = torch.device("cpu"), torch.autocast("cpu", dtype=torch.bfloat16)
    with bench.fake_tensors(True):
        bench.placed([model, frozen.vae, frozen.image_encoder, vgg], cpu)
        image = lambda: torch.rand(1, 3, 512, 512) * 2 - 1
        mask = torch.ones(1, 1, 512, 512)
        mask[..., 128:384, 128:384] = 0
        batch = dict(source=image(), mask=mask, reference=torch.rand(1, 3, 224, 224), target=image(),
                     encoder_reference=torch.rand(1, 3, 224, 224))
        for recipe, checkpointing in (("all", False), ("hint", True)):
            trainee = train.Trainee(dtc.freeze_for(model, recipe))
            model.unet.grad_checkpointing = model.hint_encoder.grad_checkpointing = checkpointing
            params = [p for p in trainee.parameters() if p.requires_grad]
            totals = train.dtc_step(trainee, trainee, frozen, vgg, [batch], 0, args, 0, cpu, autocast)
            assert totals.shape == (3,) and all(p.grad is not None for p in params)
            assert len(params) < len(list(model.parameters())) if recipe == "hint" else all(
                p.requires_grad for p in model.parameters())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt = torch.optim.AdamW(params, lr=1e-5)
            opt.step()
            assert all(len(opt.state[p]) == 3 for p in params)  # step, exp_avg, exp_avg_sq
            model.zero_grad(set_to_none=True)
        with autocast:
            x, cond = dtc.generate(model.eval(), frozen, batch["source"], mask, batch["reference"], None, steps=2,
                                   progress=False)
    assert x.shape == (1, 3, 512, 512) and cond["tokens"].shape == (1, 257, 1536)

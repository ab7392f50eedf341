# ----------------------------------------------------------------------------- evaluate.py
import pytest
import torch

import evaluate


def test_eval_psnr_ssim_identity_and_perturbed():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 32, 32, generator=g)
    fill = torch.zeros(2, 1, 32, 32)
    fill[:, :, 8:24, 4:20] = 1
    assert torch.isinf(evaluate.psnr_masked(target, target, fill)).all()
    assert torch.allclose(evaluate.ssim_masked(target, target, fill), torch.ones(2, dtype=torch.float64))
    noisy = (target + 0.05 * torch.randn(target.shape, generator=g)).clamp(0, 1)
    worse = (target + 0.2 * torch.randn(target.shape, generator=g)).clamp(0, 1)
    p1, p2 = evaluate.psnr_masked(noisy, target, fill), evaluate.psnr_masked(worse, target, fill)
    s1, s2 = evaluate.ssim_masked(noisy, target, fill), evaluate.ssim_masked(worse, target, fill)
    assert torch.isfinite(p1).all() and (p1 > p2).all() and (s1 < 1).all() and (s2 < s1).all()
    # only the region counts: damage outside it changes nothing
    outside = target.clone()
    outside[:, :, :4] = 0
    assert torch.isinf(evaluate.psnr_masked(outside, target, fill)).all()
    # PSNR by hand: a constant error of 0.1 in [0,1] is 20 dB
    torch.testing.assert_close(evaluate.psnr_masked((target * 0.5) + 0.1, target * 0.5, fill), torch.full((2,), 20.0))


def test_eval_ssim_formula_on_constant_images():
    """For constant images a, b the SSIM is (2ab + C1) / (a^2 + b^2 + C1) everywhere (variances are 0)."""
    a, b = torch.full((1, 3, 16, 16), 0.3, dtype=torch.float64), torch.full((1, 3, 16, 16), 0.6, dtype=torch.float64)
    c1 = 0.01 ** 2
    torch.testing.assert_close(evaluate.ssim_map(a, b), torch.full_like(a, (2 * 0.18 + c1) / (0.09 + 0.36 + c1)))


def test_eval_frechet_distance_closed_form():
    """Diagonal covariances: FD = |mu_a - mu_b|^2 + sum (s_a + s_b - 2 sqrt(s_a s_b))."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5]) + 1.0
    va, vb = torch.cov(a.T).diagonal(), torch.cov(b.T).diagonal()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + (va + vb - 2 * (va * vb).sqrt()).sum()
    assert abs(evaluate.frechet_distance(a, b) - expected) < 0.05  # off-diagonal sampling noise only
    assert abs(evaluate.frechet_distance(a, a)) < 1e-6


def test_eval_cli_against_itself_and_perturbed(tmp_path):
    """--pred_dir=target/ scores psnr inf and ssim 1; perturbed predictions score finite, lower values."""
    from PIL import Image
    import data, dtc
    from _test_dtcmodel import TINY_VAE, TINY_VIT, randomise, tiny_dtc_config
    from dinov2 import DINOv2
    from vae import AutoencoderKL
    world = data.TeachingWorld(size=32, split="heldout", length=4, seed=0, ref_size=(32, 32))
    data.write_triplets(tmp_path / "set", [dict(world[i], name=f"s{i}") for i in range(4)])
    model = randomise(dtc.DiffuseToChoose(tiny_dtc_config()), std=0.02)
    frozen = dtc.Frozen(vae=AutoencoderKL(TINY_VAE), image_encoder=randomise(DINOv2(TINY_VIT), std=0.02))
    dtc.save_dtc(model, tmp_path / "m.safetensors", frozen)
    args = [f"--data={tmp_path / 'set'}", f"--dtc={tmp_path / 'm.safetensors'}", "--size=32"]
    same = evaluate.main(args + [f"--pred_dir={tmp_path / 'set' / 'target'}"])
    assert same["psnr_masked"] == float("inf") and abs(same["ssim_masked"] - 1) < 1e-9
    assert abs(same["dino_i"]) <= 1 and "fd_dino" not in same
    (tmp_path / "noisy").mkdir()
    for p in (tmp_path / "set" / "target").iterdir():
        x = torch.frombuffer(bytearray(Image.open(p).tobytes()), dtype=torch.uint8).float()
        x = (x + 40 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 255)
        Image.frombytes("RGB", (32, 32), x.to(torch.uint8).numpy().tobytes()).save(tmp_path / "noisy" / p.name)
    noisy = evaluate.main(args + [f"--pred_dir={tmp_path / 'noisy'}", "--fd_min=4"])
    assert 5 < noisy["psnr_masked"] < 40 and noisy["ssim_masked"] < 0.99 and "fd_dino" in noisy
    sampled = evaluate.main(args + ["--steps=2", "--batch_size=2"])  # the sampling path runs end to end
    assert sampled["psnr_masked"] < float("inf")

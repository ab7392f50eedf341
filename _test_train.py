# ----------------------------------------------------------------------------- train.py
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import train
from data import TeachingWorld, to_pil, write_triplets
from dtc import VGGLoss, load_dtc
from vae import LATENT_SCALE

HERE = os.path.dirname(os.path.abspath(__file__))
# the smallest useful run: 32x32 images (8x8 latents), batch 2, a 2-step VAE phase, no sample grids
SMALL = ["--size=32", "--batch_size=2", "--vae_steps=2", "--sample_every=0", "--log_every=1000"]


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def run_script(args, **kw):
    """A script in a fresh process, on one thread (on a busy 2-core machine, threads that wait for each other make
    a small run many times slower)."""
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


@pytest.fixture
def one_thread():
    """In-process runs on one thread too (same reason); also what torchrun gives each process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted 6-step tiny run, shared by the resume and sample.py tests."""
    out = str(tmp_path_factory.mktemp("train") / "full")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train.main([*SMALL, f"--out_dir={out}", "--max_steps=6"])
    torch.set_num_threads(threads)
    return out


def test_train_overfit_batch_lowers_loss(tmp_path, one_thread):
    """--overfit_batch (one fixed batch, fixed t and noise): the loss must fall fast."""
    train.main([*SMALL, f"--out_dir={tmp_path}", "--max_steps=12", "--overfit_batch"])
    l = losses(tmp_path)
    assert len(l) == 12 and l[-1] < 0.5 * l[0], l


def test_train_resume_reproduces_losses_exactly(tiny_run, tmp_path, one_thread):
    """Stop after 3 steps, --resume to 6: steps 4..6 have the uninterrupted run's losses, bit for bit."""
    train.main([*SMALL, f"--out_dir={tmp_path}", "--max_steps=3"])
    train.main([*SMALL, f"--out_dir={tmp_path}", "--max_steps=6", "--resume"])
    assert losses(tmp_path) == losses(tiny_run)
    full = torch.load(os.path.join(tiny_run, "ckpt.pt"), weights_only=True)
    resumed = torch.load(os.path.join(tmp_path, "ckpt.pt"), weights_only=True)
    for k, v in full["trainee"].items():
        assert torch.equal(v, resumed["trainee"][k]), k


def test_train_refuses_to_overwrite_a_run(tiny_run):
    """Without --resume an existing OUT_DIR/ckpt.pt is never overwritten."""
    with pytest.raises(SystemExit, match="--resume"):
        train.main([*SMALL, f"--out_dir={tiny_run}", "--max_steps=6"])


def test_train_two_processes_match_one(tmp_path, one_thread):
    """torchrun with 2 processes (gloo) x batch 2 == 1 process x batch 2 x grad_accum 2, parameters and losses.
    One thread per process on both sides, so the float sums are the same sums (with different thread counts
    they differ in the last bits, and Adam turns near-zero gradients of either sign into +-lr steps)."""
    common = [*SMALL, "--max_steps=3"]
    two = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *common,
                      f"--out_dir={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stderr[-3000:]
    train.main([*common, "--grad_accum=2", f"--out_dir={tmp_path / 'one'}"])
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    for part in ("trainee", "vae"):
        for k, v in a[part].items():
            torch.testing.assert_close(v, b[part][k], rtol=1e-6, atol=1e-7, msg=k)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-6)


def write_vitonhd(root, names):
    """A fake VITON-HD release: train_pairs.txt (unpaired, as the real one) and train/{image,cloth,image-parse-v3}."""
    for folder in ("image", "cloth", "image-parse-v3"):
        (root / "train" / folder).mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name in names:
        for folder in ("image", "cloth"):  # 48x64 (W x H), 3:4 as the real 768x1024
            to_pil(torch.rand(3, 64, 48, generator=g) * 2 - 1).save(root / "train" / folder / f"{name}.jpg")
        parse = torch.zeros(64, 48, dtype=torch.uint8)
        parse[20:45, 10:38] = 5  # upper clothes
        parse[5:18, 16:32] = 13  # face
        im = Image.frombytes("P", (48, 64), bytes(parse.flatten().tolist()))  # label ids, as the palette PNGs
        im.putpalette([0, 0, 0, 255, 0, 0] * 128)
        im.save(root / "train" / "image-parse-v3" / f"{name}.png")
    (root / "train_pairs.txt").write_text("".join(f"{a}.jpg {b}.jpg\n" for a, b in zip(names, names[::-1])))


def write_triplet_folder(root, n):
    world = TeachingWorld(32, "train", length=n, seed=1, ref_size=(32, 32), train=False)
    write_triplets(root, [world[i] for i in range(n)])


def test_train_both_dataset_layouts_run(tmp_path, one_thread):
    """A VITON-HD release and a triplet folder each train a step and draw a sample grid."""
    write_vitonhd(tmp_path / "viton", ["00001_00", "00002_00"])
    write_triplet_folder(tmp_path / "triplets", 2)
    for layout in ("viton", "triplets"):
        out = tmp_path / f"out_{layout}"
        train.main([*SMALL, f"--data={tmp_path / layout}", f"--out_dir={out}", "--max_steps=1", "--sample_every=1"])
        assert len(losses(out)) == 1
        grid = Image.open(out / "samples" / "step_000001.png")
        assert grid.size == (5 * 128, 2 * 128)  # 2 samples x (source | mask | reference | hint | sample)


def test_train_checkpoint_samples_in_sample_py(tiny_run, tmp_path):
    """dtc.safetensors from train.py carries the tiny VAE and encoder: sample.py --dtc loads it and samples."""
    model, frozen = load_dtc(os.path.join(tiny_run, "dtc.safetensors"))
    assert frozen is not None and model.cfg.image_size == 32
    write_triplet_folder(tmp_path / "t", 1)
    files = {k: next((tmp_path / "t" / k).iterdir()) for k in ("source", "mask", "reference")}
    r = run_script(["sample.py", f"--dtc={tiny_run}/dtc.safetensors", f"--source={files['source']}",
                    f"--mask={files['mask']}", f"--reference={files['reference']}", f"--out={tmp_path / 'r.png'}",
                    "--steps=2", "--size=32"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert Image.open(tmp_path / "r.png").size == (32, 32)


def test_train_bad_data_one_line_or_skipped(tmp_path, one_thread):
    """A triplet without its reference: exit 1 with one line naming the file; --skip_bad trains on the rest."""
    write_triplet_folder(tmp_path / "t", 3)
    bad = next((tmp_path / "t" / "reference").iterdir())
    bad.unlink()
    r = run_script(["train.py", *SMALL, f"--data={tmp_path / 't'}", f"--out_dir={tmp_path / 'out'}", "--max_steps=1"])
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and bad.stem in lines[0], r.stderr
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        train.main([*SMALL, f"--data={tmp_path / 't'}", f"--out_dir={tmp_path / 'out'}", "--max_steps=1", "--skip_bad"])
    assert len(losses(tmp_path / "out")) == 1


def test_train_sigterm_saves_then_resumes(tmp_path, one_thread, capsys):
    """SIGTERM mid-run: the step finishes, ckpt.pt is saved, exit 0; --resume continues from there with the
    run's own options."""
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "train.py", *SMALL, f"--out_dir={out}", "--max_steps=100000"], cwd=HERE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text().strip():
        assert p.poll() is None and time.time() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert "continue with --resume" in err
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step >= 1 and len(losses(out)) == step
    # the run's options come from the checkpoint: only max_steps (changeable) is taken, --lr is refused
    train.main([f"--out_dir={out}", "--resume", f"--max_steps={step + 2}", "--lr=0.5"])
    assert "--lr=0.5 ignored" in capsys.readouterr().err
    assert len(losses(out)) == step + 2 and (out / "dtc.safetensors").exists()
    assert torch.load(out / "ckpt.pt", weights_only=True)["args"]["lr"] == 1e-3


def test_train_ema_is_exported(tmp_path, one_thread):
    """With --ema the exported weights are the EMA ones saved in the checkpoint, not the raw ones."""
    train.main([*SMALL, f"--out_dir={tmp_path}", "--max_steps=3", "--ema=0.5"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model, _ = load_dtc(tmp_path / "dtc.safetensors")
    w = "unet.out.2.weight"
    torch.testing.assert_close(model.state_dict()[w], ckpt["ema"]["model." + w], rtol=0, atol=0)
    assert not torch.equal(ckpt["ema"]["model." + w], ckpt["trainee"]["model." + w])


def test_train_grad_checkpointing_same_losses(tiny_run, tmp_path, one_thread):
    """--grad_checkpointing recomputes activations in backward: the run's losses are unchanged."""
    train.main([*SMALL, f"--out_dir={tmp_path}", "--max_steps=6", "--grad_checkpointing"])
    assert losses(tmp_path) == pytest.approx(losses(tiny_run), rel=1e-5)


def test_train_vae_rescale_is_exact():
    """Folding the latent scale into the tiny VAE: decode(s z) is the old decode(z), and the posterior is s times."""
    args = train.parse_args(SMALL)
    torch.manual_seed(0)
    _, frozen = train.build_model(args)
    vae = frozen.vae.requires_grad_(False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    before = vae.encode(x)
    z = before.mean
    decoded = vae.decode(z)
    train.fold_latent_scale(vae, 3.0)
    after = vae.encode(x)
    torch.testing.assert_close(after.mean, 3.0 * before.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after.std, 3.0 * before.std, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vae.decode(3.0 * z), decoded, rtol=1e-5, atol=1e-5)
    assert LATENT_SCALE == 0.18215


def test_train_vgg_loss_backpropagates_through_the_decoder(one_thread):
    """The VGG term (random VGG weights here) is positive and changes the U-Net's gradients."""
    args = train.parse_args([*SMALL, "--p_uncond=0"])
    torch.manual_seed(0)
    trainee, frozen = train.build_model(args)
    frozen.vae.requires_grad_(False)
    batch = next(iter(torch.utils.data.DataLoader(train.build_dataset(args, (32, 32)), batch_size=2)))
    grads = []
    for vgg in (None, VGGLoss()):
        trainee.zero_grad()
        totals = train.dtc_step(trainee, trainee, frozen, vgg, [batch], 0, args, 0, torch.device("cpu"),
                                torch.autocast("cpu", enabled=False)).tolist()
        grads.append(trainee.model.unet.out[2].weight.grad.clone())
    assert totals[2] > 0 and totals[0] == pytest.approx(totals[1] + 1e-3 * totals[2], rel=1e-5)
    assert not torch.allclose(grads[0], grads[1])


def test_train_sd15_preset_on_tiny_original_files(tmp_path, one_thread):
    """The sd15 preset path (dtc.from_original, frozen VAE and DINOv2, only the DTC parts trained and exported),
    on a tiny SD-1.5-layout file and a tiny DINOv2 hub file."""
    from dinov2 import DINOv2, DINOv2Config
    from unet import UNet, UNetConfig
    from vae import AutoencoderKL, VAEConfig
    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_levels=(1,), context_dim=32))
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))
    sd = {**{"model.diffusion_model." + k: v for k, v in unet.state_dict().items()},
          **{"first_stage_model." + k: v for k, v in vae.state_dict().items()}}
    torch.save({"state_dict": sd}, tmp_path / "sd.ckpt")
    vit = DINOv2(DINOv2Config(embed_dim=32, depth=1, num_heads=1, ffn="mlp", patch_size=14, img_size=56))
    torch.save(vit.state_dict(), tmp_path / "dino.pth")
    write_triplet_folder(tmp_path / "t", 2)
    out = tmp_path / "out"
    train.main(["--preset=sd15", f"--sd={tmp_path / 'sd.ckpt'}", f"--dinov2={tmp_path / 'dino.pth'}",
                f"--data={tmp_path / 't'}", f"--out_dir={out}", "--size=32", "--batch_size=2", "--max_steps=2",
                "--sample_every=2", "--vgg_weight=0", "--num_workers=0"])
    assert len(losses(out)) == 2 and (out / "samples" / "step_000002.png").exists()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["vae"] is None and not any(k.startswith("image_encoder") for k in ckpt["trainee"])
    model, frozen = load_dtc(out / "dtc.safetensors")
    assert frozen is None and model.cfg.image_size == 224
    assert not torch.equal(model.state_dict()["unet.out.2.weight"], unet.state_dict()["out.2.weight"])

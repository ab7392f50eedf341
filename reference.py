"""The independent references: diffusers' U-Net and VAE, timm's DINOv2, in the layout of our configs.

A module of its own because two places compare against the same twins: the parity tests (test_dtc.py) and the
reference rows of bench.py. diffusers and timm are test-only dependencies, so they are imported inside the functions:
importing this module never needs them, and a caller catches ImportError. Nothing of ours is imported either; the
functions read our configs and modules by their field names.

The builders give a randomly initialised twin on the current torch.device (build under torch.device("meta") for
shapes only). The *_as_* functions build the twin on meta and load our weights through the library's own converter of
the original files, with assign=True: the twin holds our very tensors, no copy (but for the few a converter
computes).
"""
import torch


def diffusers_unet(cfg):
    """diffusers' UNet2DConditionModel in the layout of a unet.UNetConfig (its other options are SD 1.x's defaults)."""
    from diffusers import UNet2DConditionModel
    down = tuple("CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D"
                 for i in range(len(cfg.channel_mult)))
    return UNet2DConditionModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, layers_per_block=cfg.num_res_blocks,
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult), down_block_types=down,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        cross_attention_dim=cfg.context_dim, attention_head_dim=cfg.num_heads,  # diffusers' name for the head count
        transformer_layers_per_block=cfg.transformer_depth)


def diffusers_vae(cfg):
    """diffusers' AutoencoderKL in the layout of a vae.VAEConfig (diffusers has one latent width: z = embed_dim)."""
    from diffusers import AutoencoderKL
    n = len(cfg.ch_mult)
    return AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_ch, latent_channels=cfg.embed_dim,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=cfg.norm_groups)


def timm_dinov2(cfg, img_size):
    """timm's DINOv2 ViT in the layout of a dinov2.DINOv2Config, built for img_size (int or (H, W)). It returns
    every final-normed token from forward_features (global_pool="", no head), as our DINOv2 does."""
    import timm
    kw = {}
    if cfg.ffn == "swiglu":  # timm packs gate and value in one fc1 of int(D * mlp_ratio) = 2 * hidden (dinov2.py's)
        hidden = (int(4 * cfg.embed_dim * 2 / 3) + 7) // 8 * 8
        kw["mlp_ratio"] = (2 * hidden + 0.5) / cfg.embed_dim  # + 0.5: int() must not round 2 * hidden down
    if cfg.num_registers:
        kw["reg_tokens"] = cfg.num_registers
    # the named variants bring DINOv2's layer scale, SwiGLU (giant) and register handling; the sizes are ours
    name = f"vit_{'giant' if cfg.ffn == 'swiglu' else 'small'}_patch14_{'reg4_' if cfg.num_registers else ''}dinov2"
    return timm.create_model(name, pretrained=False, img_size=img_size, patch_size=cfg.patch_size,
                             in_chans=cfg.in_chans, embed_dim=cfg.embed_dim, depth=cfg.depth,
                             num_heads=cfg.num_heads, num_classes=0, global_pool="", **kw)


def _diffusers_twin(ours, build, convert, prefix):
    """build(ours.cfg) on meta, then our weights keyed as the original file keys them (prefix + our key), through
    diffusers' converter of such files (which reads the twin's layout from the twin's config)."""
    with torch.device("meta"):
        twin = build(ours.cfg)
    ldm = {prefix + k: v for k, v in ours.state_dict().items()}
    twin.load_state_dict(convert(ldm, twin.config), strict=True, assign=True)
    return twin.eval()


def unet_as_diffusers(unet):
    """Our U-Net's weights in diffusers' UNet2DConditionModel, through diffusers' single-file converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    return _diffusers_twin(unet, diffusers_unet, convert_ldm_unet_checkpoint, "model.diffusion_model.")


def vae_as_diffusers(vae):
    """Our VAE's weights in diffusers' AutoencoderKL, through diffusers' single-file converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    return _diffusers_twin(vae, diffusers_vae, convert_ldm_vae_checkpoint, "first_stage_model.")


def dinov2_as_timm(state_dict, cfg, img_size):
    """A hub-keyed DINOv2 state dict in timm's ViT at img_size, through timm's checkpoint_filter_fn. The caller
    resamples pos_embed to img_size's grid beforehand, by the rule its file was trained with (else timm's applies)."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    with torch.device("meta"):
        twin = timm_dinov2(cfg, img_size)
    # a copy: the filter pops keys (and folds pos_embed's row 0 into cls_token for register models)
    twin.load_state_dict(checkpoint_filter_fn(dict(state_dict), twin), strict=True, assign=True)
    return twin.eval()

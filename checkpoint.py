"""
Reading the original weight files, shared by unet.py, vae.py, dinov2.py and dtc.py.

The original files come in three containers: `.safetensors`, a Lightning `.ckpt` whose tensors sit
under a `state_dict` key (SD 1.5, SD 1.5-inpainting, Paint-by-Example), and a bare pickled state
dict (`.pth`, the DINOv2 hub files). Our modules are named after the original keys, so loading is
always the same three steps: read the file, keep the keys under one prefix, and load strictly.
Every failure becomes a `CheckpointError` whose message names the file and the problem.
"""
import json
import os
import pickle

import torch
from safetensors.torch import load_file as load_safetensors


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message names the file and what is wrong."""


def first_sentence(text):
    """The first sentence of an error message, for one-line errors (library messages run to paragraphs)."""
    text = " ".join(text.split())
    return text.split(". ")[0].rstrip(".")


def not_a_file(path):
    """Why `path` is no file to read ("file not found", or "is a folder, expected a file"); None when it is one.
    Every reader of the project words a missing input this way."""
    if os.path.isdir(path):
        return "is a folder, expected a file"
    return None if os.path.isfile(path) else "file not found"


def damaged(source, error):
    """The error for a file that does not decode (truncated, corrupt or not this format), in one line."""
    return CheckpointError(f"{source}: cannot read the file (truncated or corrupt?): "
                           f"{type(error).__name__}: {first_sentence(str(error))}")


def load_pickle(path):
    """torch.load of a pickled file with weights_only=True (tensors and plain containers only: a pickle that would
    run code or build arbitrary objects is refused); every failure is a CheckpointError naming the file."""
    source = str(path)
    if why := not_a_file(source):
        raise CheckpointError(f"{source}: {why}")
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        # PyTorch's message opens with advice to load the file with weights_only=False, which a project that
        # refuses unsafe files does not pass on; the reason is the paragraph that follows it
        reasons = [p for p in str(e).split("\n\n")[1:] if p.strip() and not p.startswith("Check the documentation")]
        raise CheckpointError(f"{source}: refused: the pickle holds more than tensors and plain containers"
                              f"{': ' + first_sentence(reasons[0]) if reasons else ''}") from None
    except Exception as e:  # zipfile and pickle raise their own types on damage
        raise damaged(source, e) from None


def read_state_dict(path_or_state_dict, source="<state dict>"):
    """Returns (state_dict, source) where source names the file for messages (for an in-memory state dict,
    the `source` given: the file it was read from, or '<state dict>')."""
    if isinstance(path_or_state_dict, dict):
        sd = path_or_state_dict
    elif not str(path_or_state_dict).endswith(".safetensors"):
        sd, source = load_pickle(path_or_state_dict), str(path_or_state_dict)
    else:
        source = str(path_or_state_dict)
        if why := not_a_file(source):
            raise CheckpointError(f"{source}: {why}")
        try:
            sd = load_safetensors(source, device="cpu")
        except Exception as e:  # safetensors raises its own types on damage
            raise damaged(source, e) from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{source}: expected a state dict, found a {type(sd).__name__}")
    if isinstance(sd.get("state_dict"), dict):  # Lightning checkpoints: {'state_dict': ..., 'global_step': ...}
        sd = sd["state_dict"]
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{source}: holds no tensors")
    return sd, source


def config_from_metadata(meta, key, build, source):
    """build(the JSON object under `key` of a .safetensors file's metadata). A missing key, broken JSON or a config
    that does not build (missing or unknown fields) is a CheckpointError naming the file."""
    if key not in meta:
        raise CheckpointError(f"{source}: its metadata has no {key} (not written by train.py, or edited since)")
    try:
        return build(json.loads(meta[key]))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{source}: its metadata's {key} is not valid JSON ({e})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{source}: its metadata's {key} is incomplete or wrong ({type(e).__name__}: {e})") from None


def strip_prefix(sd, prefix):
    """The tensors under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def cast_floats(sd, dtype):
    """Floating tensors to `dtype` (None keeps what the file stored); integer tensors are never cast."""
    if dtype is None:
        return sd
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def load_strict(module, sd, source, likely_cause=""):
    """Loads `sd` into `module` by exact key and shape, keeping the file's dtypes.

    `module` may live on the meta device: tensors are assigned, not copied, so a full-size model
    is never initialised only to be overwritten. `likely_cause` is added to the error message.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        lines = [f"{source}: does not match {type(module).__name__}"]
        for name, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if keys:
                more = f" ... and {len(keys) - 5} more" if len(keys) > 5 else ""
                lines.append(f"  {len(keys)} {name}: {', '.join(keys[:5])}{more}")
        if likely_cause:
            lines.append(f"  likely cause: {likely_cause}")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(sd, strict=True, assign=True)
    return module


def likely_cause(keys):
    """A guess at why a file's keys do not fit, from the naming schemes of the usual wrong files."""
    keys = list(keys)
    if any(k.startswith(("down_blocks.", "unet.down_blocks.", "encoder.down_blocks.")) or ".down_blocks." in k for k in keys):
        return "this is a diffusers-format file; pass the original single-file checkpoint (.ckpt/.safetensors)"
    if any(k.startswith(("embeddings.", "encoder.layer.")) for k in keys):
        return "this is a transformers-format DINOv2; pass the original hub file (dinov2_vit*14*_pretrain.pth)"
    if any(k.startswith("lora_") or ".lora_" in k for k in keys):
        return "this is a LoRA file, not a full checkpoint"
    return ""

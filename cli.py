"""
What the commands (sample.py, train.py, evaluate.py, bench.py) share: the device and dtype they run on, and how bad input
ends: exit status 1 and one line naming the file or option and the problem, no traceback.
"""
import sys

import torch
from tqdm import tqdm

from checkpoint import CheckpointError
from data import DataError


def pick_device(name):
    """--device: "auto" is CUDA when there is one, else the CPU; "cpu" and "cuda" as given, "cuda" only where
    there is one (else a one-line DataError, before any work)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device=cuda: CUDA is not available here; use --device=cpu (or auto)")
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def pick_dtype(name, device):
    """--dtype on `device` ("cpu" or "cuda"): "auto" is bfloat16 on a GPU that has it, else float32; the others as
    named. bfloat16 on a GPU without it (before Ampere) is refused in one line (a DataError)."""
    if name == "auto":
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name == "bfloat16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise DataError(f"--dtype=bfloat16: this GPU ({torch.cuda.get_device_name()}) has no bfloat16; use float16 "
                        "or float32")
    return getattr(torch, name)


def check_dtype(args):
    """--device and --dtype checked together before any work: a device that is not there and a dtype the GPU lacks
    are one line each (exit 1); half precision on a CPU runs, slowly on most CPUs, which a one-line warning says."""
    device = pick_device(args.device)
    if pick_dtype(args.dtype, device) != torch.float32 and device == "cpu":
        print(f"warning: --dtype={args.dtype} on the CPU: it runs, but most CPUs compute it slower than float32",
              file=sys.stderr)


def bad_option(args, option, why):
    """The error for an option's value, as every command words it: "--option=value: why"."""
    return DataError(f"--{option}={getattr(args, option)}: {why}")


def one_line(error):
    """An error's message on one line; from a DataLoader worker, the original one."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return "; ".join(line.strip() for line in text.splitlines())


def run(main, argv=None, errors=(CheckpointError, DataError)):
    """Runs a command's main(argv); returns the exit status: 0, or 1 after printing an error of `errors` as one
    line (on a line of its own, even below a progress bar)."""
    try:
        main(argv)
    except errors as e:
        tqdm.write(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0

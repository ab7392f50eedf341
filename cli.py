"""
What the commands (sample.py, train.py, evaluate.py, bench.py) share: the device and dtype they run on, the CPU threads
they use, their help layout, the ranges of the sampling options, and how bad input ends: exit status 1 and one line
naming the file or option and the problem, no traceback. An interrupted command ends with one line too, and the exit
status a shell gives a process ended by that signal (130 for Ctrl-C).
"""
import argparse
import math
import os
import signal
import sys

import torch
from tqdm import tqdm

from checkpoint import CheckpointError, not_a_file
from data import DataError
from diffusion import Schedule

# The largest --size (working size) sample.py and evaluate.py take: 4 x SD 1.5's 512, the largest size any model here
# is trained at. Far above its training size a diffusion model repeats the product across the region, and the
# latents' self-attention needs memory that grows with the fourth power of the side (4096 asked for terabytes).
MAX_SIZE = 2048
MAX_SEED = 2 ** 32 - 1  # sample i uses seed + i, batch b seed + b: far below torch's limit of 2^64 - 1 either way


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the module docstring as written, and after each option's description its default, unless the
    description already says "default: ..." (as an option whose default is None does, in words)."""

    def _get_help_string(self, action):
        if "default:" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


class Interrupted(Exception):
    """A run stopped by a signal before it finished (train.py saves first): the message says what was kept and how to
    go on; the exit status is 128 + the signal's number, as a shell reports a process that signal ended."""

    def __init__(self, signum, message):
        super().__init__(f"{signal.Signals(signum).name} {message}")
        self.status = 128 + signum


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
    are one line each (exit 1); half precision on a CPU runs, slowly on most CPUs, which a one-line warning says.
    Returns (device, dtype): what "auto" picked, so the command picks once."""
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if dtype != torch.float32 and device == "cpu":
        print(f"warning: --dtype={args.dtype} on the CPU: it runs, but most CPUs compute it slower than float32",
              file=sys.stderr)
    return device, dtype


def bad_option(args, option, why):
    """The error for an option's value, as every command words it: "--option=value: why"."""
    return DataError(f"--{option}={getattr(args, option)}: {why}")


def check_files(args, *options):
    """Each of these options that is given names a file to read: one line when it is missing or a folder."""
    for option in options:
        path = getattr(args, option)
        if path is not None and (why := not_a_file(path)):
            raise DataError(f"{path}: {why} (--{option})")


def check_folder(args, option):
    """The option, when given, names a folder to read: one line when it is missing or a file."""
    path = getattr(args, option)
    if path is not None and not os.path.isdir(path):
        raise DataError(f"{path}: {'is a file, expected a folder' if os.path.exists(path) else 'folder not found'} "
                        f"(--{option})")


def check_sampling_options(args):
    """The options sample.py and evaluate.py share, one range each: --steps, --guidance (None: the model's own),
    --seed and --size (None: the model's training size)."""
    if not 1 <= args.steps <= Schedule().num_steps:  # past 1000 the DDIM spacing would repeat t = 1
        raise bad_option(args, "steps", f"DDIM steps must be 1 ... {Schedule().num_steps} (the schedule's steps)")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise bad_option(args, "guidance", "must be a finite number >= 0 (1: no guidance; paper: 5)")
    if not 0 <= args.seed <= MAX_SEED:
        raise bad_option(args, "seed", "must be 0 ... 2^32 - 1")
    if args.size is not None and not 1 <= args.size <= MAX_SIZE:
        raise bad_option(args, "size", f"the working size must be 1 ... {MAX_SIZE} pixels (4 x SD 1.5's 512: far "
                         "above its training size a model repeats the product, and attention's memory grows with "
                         "the fourth power of the side)")


def one_line(error):
    """An error's message on one line; from a DataLoader worker, the original one."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return "; ".join(line.strip() for line in text.splitlines())


def run(main, argv=None, errors=(CheckpointError, DataError)):
    """Runs a command's main(argv); returns the exit status: 0; 1 after printing an error of `errors` as one line
    (on a line of its own, even below a progress bar); 130 after Ctrl-C, or Interrupted's status, with one line."""
    try:
        main(argv)
    except errors as e:
        tqdm.write(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        tqdm.write("interrupted (Ctrl-C)", file=sys.stderr)
        return 128 + signal.SIGINT
    except Interrupted as e:
        tqdm.write(f"stopped by {e}", file=sys.stderr)
        return e.status
    return 0


def use_free_cores(loadavg="/proc/loadavg"):
    """Sets torch's CPU threads for a command run from the shell: as many as the cores free when it starts, at least
    one; OMP_NUM_THREADS, when set, is obeyed instead. Busy cores are the threads the kernel counts as runnable now
    (`loadavg`'s fourth field, less this one); without that file, the last minute's load average. Why: a thread that
    has no core of its own makes the others wait for it at every op. How long a waiting thread spins before it
    sleeps (GOMP_SPINCOUNT, which the commands set to 2000 before they import torch: OpenMP reads it only then) is
    the other half, measured on the tiny training step with 2 threads, images/s on 2 free cores / with a job that
    started on one of them: libgomp's default 300,000 spins 103 / 7 (the collapse), 20,000 105 / 21, 2000 89 / 39,
    none (OMP_WAIT_POLICY=PASSIVE) 67 / 44; one thread 67-70 either way. Why the count now and not the load
    average: the average lags by minutes, so a run started just after another ended took one thread of two free
    cores. Torch's own default is one thread per core, whatever else runs."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open(loadavg) as f:
            busy = int(f.read().split()[3].split("/")[0]) - 1  # "runnable/total": runnable includes this thread
    except (OSError, IndexError, ValueError):
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this system: all cores
            busy = 0.0
    torch.set_num_threads(max(1, min(cores, round(cores - busy))))

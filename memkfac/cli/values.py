"""Command-line values: argparse ``type=`` converters, and the usage errors found after parsing.

A value the command cannot use is a usage error: exit status 2, reported before any work (runtime
errors exit 1). The converters check what a value shows on its own; what needs the model (a layer it
lacks) or several options together is checked by the engine's own arguments inside ``usage_errors()``,
so each bound is written once, in the engine.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from memkfac.errors import MemkfacError


def add_model_argument(
    parser: argparse.ArgumentParser, role: str, default: str | None = None, optional=False
):
    """The positional MODEL of every command that reads a model; ``role`` says which model it is.

    With a ``default`` (or ``optional``) MODEL may be left out.
    """
    from memkfac.models import BUILTIN_MODELS

    spec = f"a local Hugging Face directory, a builtin name ({', '.join(BUILTIN_MODELS)}) or a hub id"
    shown = f" (default: {default})" if default else ""
    optional = optional or default is not None
    parser.add_argument(
        "model",
        metavar="MODEL",
        nargs="?" if optional else None,
        default=default,
        help=f"{role}: {spec}{shown}",
    )


class UsageError(MemkfacError):
    """A command-line value the command cannot use, found after parsing: exit status 2."""


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Report a ``MemkfacError`` raised while the command line becomes arguments as a ``UsageError``."""
    try:
        yield
    except UsageError:
        raise
    except MemkfacError as e:
        raise UsageError(e.problem, e.fix) from None


def int_at_least(low: int) -> Callable[[str], int]:
    """A converter of integers >= ``low``."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    convert.__name__ = f"int_at_least_{low}"
    return convert


positive_int = int_at_least(1)
count = int_at_least(0)


def keep_mass(text: str) -> float:
    """A fraction of curvature mass to keep, in the engine's range."""
    from memkfac.selection import check_keep_mass  # imports torch: only when a value is given

    try:
        return check_keep_mass(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.6, got {text!r}") from None
    except MemkfacError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def name(text: str) -> str:
    """A name that becomes a file name or table partition (a variant, a probe set)."""
    from memkfac.paths import safe_name

    try:
        return safe_name(text)
    except MemkfacError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def name_list(text: str) -> tuple[str, ...]:
    """Comma-separated names: ``gate,up`` -> ``("gate", "up")``."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def float_list(text: str) -> tuple[float, ...]:
    """Comma-separated numbers: ``0.99,0.9`` -> ``(0.99, 0.9)``."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def model_layers(spec: str, model_dir: Path) -> list[int]:
    """The decoder layers that ``spec`` ('22-24', '22,23,24', 'all') names in the model at ``model_dir``."""
    from transformers import AutoConfig

    from memkfac.targets import parse_layers

    with usage_errors():
        return parse_layers(spec, AutoConfig.from_pretrained(model_dir).num_hidden_layers)


def probe_set_name(given: str | None, probes: Path) -> str:
    """The probe set's name in the tables: ``--probe-set``, else the probe file's name stem."""
    from memkfac.paths import safe_name

    with usage_errors():
        return given or safe_name(probes.stem, "probe set name (the file name stem; or pass --probe-set)")


def device_name(text: str) -> str:
    """A device name memkfac runs on (cpu, cuda, cuda:N, mps); whether this machine has it is checked
    when the command starts (``checked_placement``), a runtime error."""
    from memkfac.devices import check_device_name

    try:
        return check_device_name(text, "--device")
    except MemkfacError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_device_arguments(
    parser: argparse.ArgumentParser, what: str = "the model", dtypes: tuple[str, ...] | None = None
) -> None:
    """``--device`` and ``--dtype`` (one of ``dtypes``, default every dtype of ``memkfac.devices``; none
    for a command whose model trains in float32): where ``what`` runs, for every command that runs a
    model. A misspelt device is a usage error; one this machine lacks fails at the start (exit 1)."""
    from memkfac.devices import DTYPES

    parser.add_argument(
        "--device",
        type=device_name,
        default="cpu",
        help=f"where {what} runs: cpu (default), cuda, cuda:N or mps",
    )
    if dtypes != ():
        parser.add_argument(
            "--dtype",
            choices=dtypes or DTYPES,
            default="float32",
            help=f"dtype {what} runs in (default: float32)",
        )


def checked_placement(args: argparse.Namespace) -> tuple[str, str]:
    """``(args.device, args.dtype)`` after checking them against this machine (a device it lacks, bf16
    on a GPU without it), before the command does any work; errors name the options."""
    from memkfac.devices import resolve_device, resolve_dtype

    dtype = getattr(args, "dtype", "float32")
    resolve_dtype(dtype, resolve_device(args.device, "--device"), "--dtype")
    return args.device, dtype

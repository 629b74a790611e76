"""Output folders, one set of rules for every stage: staged, published whole, never over an input.

Train, merge, eval, bench and export all write a folder the same way: into a hidden staging folder beside the target,
renamed into place only when complete, so a folder that exists is always finished. Before anything is written the
target is checked: it must not already exist (unless ``--force``), it must be writable (so an hour of training is
never lost at save time), and it may never be, contain or lie inside one of the command's own inputs, whatever
``--force`` says.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from qlora_kit.errors import UserError

CORE_PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")


def staging_dir_for(target: Path) -> Path:
    return target.parent / f".{target.name}.partial"


def fresh_staging(target: Path) -> Path:
    """An empty staging folder for ``target`` (what an interrupted earlier attempt left there is discarded)."""
    staging = staging_dir_for(target)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def unique_staging(target: Path) -> Path:
    """A staging folder of this process alone, for targets that several processes may write at once (the cache)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))


def publish_files(staging: Path, folder: Path, names: Iterable[str]) -> list[Path]:
    """Move finished files from ``staging`` into an existing ``folder`` one rename each, then drop the staging."""
    paths = []
    for name in names:
        (staging / name).replace(folder / name)
        paths.append(folder / name)
    staging.rmdir()
    return paths


def check_new_output(target: Path, force: bool, flag: str = "--output-dir") -> None:
    """An existing target is replaced only with --force."""
    if target.exists() and not force:
        raise UserError(f"output directory {target} already exists: pass --force to replace it, or set {flag}")


def check_apart(target: Path, inputs: Mapping[str, str | Path | None], flag: str = "--output-dir") -> None:
    """Refuse an output that is, contains or lies inside an input of the same command.

    Replacing the output (with --force) removes whatever is under it, so this is the check that stops a command from
    deleting the base model, adapter or data it reads. ``inputs`` maps a name for the message to a path.
    """
    out = _absolute(target)
    for name, path in inputs.items():
        if path is None or str(path) == "":
            continue
        source = _absolute(Path(path))
        if out == source or out in source.parents or source in out.parents:
            relation = "is" if out == source else "contains" if out in source.parents else "lies inside"
            raise UserError(
                f"{flag} {target}: the output {relation} {name} ({path}), which this command reads; choose an "
                "output folder elsewhere (--force never replaces an input)"
            )


def check_writable(target: Path, flag: str = "--output-dir") -> None:
    """The folder that will hold ``target`` can be created and written to, checked by writing a file there."""
    parent = _absolute(target).parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {target}: {existing} is a file, not a folder; choose an output folder elsewhere")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".qlora-kit-write-test-"):
            pass
    except OSError as exc:
        raise UserError(
            f"{flag} {target}: cannot write in {parent} ({exc.strerror or exc}); choose a writable output folder"
        ) from None


def prepare_output(
    target: Path, force: bool, inputs: Mapping[str, str | Path | None] | None = None, flag: str = "--output-dir"
) -> None:
    """Every check on an output folder, before any work starts."""
    check_apart(target, inputs or {}, flag)
    check_new_output(target, force, flag)
    check_writable(target, flag)


def publish(staging: Path, target: Path) -> None:
    """Move a finished folder into place; an old one (only with --force) is removed after the new one is in."""
    trash = target.parent / f".{target.name}.old"
    if trash.exists():
        shutil.rmtree(trash)
    if target.exists():
        target.rename(trash)
    staging.rename(target)
    if trash.exists():
        shutil.rmtree(trash)


def is_run(path: Path) -> bool:
    """Whether ``path`` looks like a training run directory (its adapter and resolved recipe are there)."""
    return (path / "adapter" / "adapter_config.json").is_file() and (path / "recipe.yaml").is_file()


def require_run(run_dir: Path) -> Path:
    """The adapter folder of a finished training run; anything else is the user's mistake, named."""
    if not run_dir.exists():
        raise UserError(f"run directory {run_dir} does not exist: give a directory written by `qlora-kit train`")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory: give a directory written by `qlora-kit train`")
    for name in ("adapter/adapter_config.json", "recipe.yaml"):
        if not (run_dir / name).is_file():
            raise UserError(
                f"run directory {run_dir} has no {name}: give a directory written by `qlora-kit train` (an "
                "unfinished run lives in a hidden .NAME.partial folder until it completes)"
            )
    return run_dir / "adapter"


def local_paths(paths: Iterable[str | None]) -> list[Path]:
    """The entries that name something on this machine (hub ids and globs that match nothing are left out)."""
    found = []
    for entry in paths:
        if not entry:
            continue
        path = Path(os.path.expanduser(entry))
        if path.exists():
            found.append(path)
        elif any(ch in entry for ch in "*?["):
            found += [p for p in Path().glob(entry)] if not path.is_absolute() else list(Path("/").glob(entry[1:]))
    return found


def peak_memory_bytes() -> int:
    """CUDA peak allocated on GPU; peak resident set size of this process on CPU."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports kilobytes


def versions(packages: Iterable[str] = CORE_PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages``; one that is not installed is left out."""
    found = {}
    for name in packages:
        try:
            found[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            continue
    return found


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser())).resolve()

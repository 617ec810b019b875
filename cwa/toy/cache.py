"""Building, caching and locating the toy world (models and data files).

Layout under the cache directory (``CWA_CACHE``, else ``~/.cache/cwa``)::

    toy/data-v<G>/            calibration.txt, heldout.txt, hellaswag.jsonl, lambada.jsonl
    toy/<variant>-v<G>/       Hugging Face folder: config, safetensors weights, tokenizer,
                              cwa_toy.json (generator version, seed, training figures)

``G`` is :data:`cwa.toy.language.GENERATOR_VERSION`. A folder is complete once its marker file
exists; it is built in a temporary sibling and renamed into place, so a crash never leaves a half
cache, and a file lock makes concurrent builders wait for one another instead of racing. A model
built with another generator version, generator output (fingerprint) or training recipe is
rebuilt. The cached model is trained in a child process (:mod:`cwa.toy.worker`) so that this
process's torch settings stay untouched and a busy machine does not slow training to a crawl.

This module imports no torch; training is imported only when a model must be built.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from cwa.errors import CwaError, InvalidInput
from cwa.progress import NULL_REPORTER, Reporter
from cwa.toy.language import GENERATOR_VERSION, generator_fingerprint

DATA_FILES = {
    "calibration": "calibration.txt",
    "heldout": "heldout.txt",
    "hellaswag": "hellaswag.jsonl",
    "lambada": "lambada.jsonl",
}
MODEL_MARKER = "cwa_toy.json"
DATA_MARKER = "cwa_toy_data.json"
LOCK_TIMEOUT_S = 900.0


class ToyBuildError(CwaError):
    """The toy world could not be built or its cache is unusable."""


def toy_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``<cache>/toy`` where ``<cache>`` is ``cache_dir``, ``$CWA_CACHE`` or ``~/.cache/cwa``."""
    root = cache_dir or os.environ.get("CWA_CACHE") or Path.home() / ".cache" / "cwa"
    return Path(root).expanduser() / "toy"


def _variant_dir(variant: str, cache_dir: str | Path | None) -> Path:
    return toy_cache_dir(cache_dir) / f"{variant}-v{GENERATOR_VERSION}"


def _data_dir(cache_dir: str | Path | None) -> Path:
    return toy_cache_dir(cache_dir) / f"data-v{GENERATOR_VERSION}"


def _check_variant(variant: str) -> str:
    from cwa.toy.recipe import VARIANTS

    if variant not in VARIANTS:
        raise InvalidInput(f"unknown toy variant {variant!r}; use one of {', '.join(VARIANTS)}")
    return variant


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def _lock(target: Path, reporter: Reporter) -> Iterator[None]:
    """Hold an exclusive file lock next to ``target`` (bounded wait, clear error).

    While it is held no other builder of ``target`` runs, so temporary folders of ``target``
    left by a builder that was killed are removed here.
    """
    from filelock import FileLock, Timeout

    lock_path = target.parent / f".{target.name}.lock"
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        reporter.info(f"waiting for another process that is building {target.name}")
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            raise ToyBuildError(
                f"another process held {lock_path} for over {LOCK_TIMEOUT_S:.0f} s; "
                "stop it or delete the lock file if no build is running"
            ) from None
    try:
        for pattern in (f".tmp-{target.name}-*", f".trash-{target.name}-*"):
            for stale in target.parent.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        lock.release()


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished ``tmp`` folder to ``final``, replacing an older one atomically enough.

    The old folder is first renamed aside (one rename), so a reader sees either the old or the
    new complete folder, or briefly none, never a mixture.
    """
    trash = None
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
    os.replace(tmp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _write_data(folder: Path) -> dict:
    from cwa.toy.tasks import build_eval_sets

    sets = build_eval_sets()
    (folder / DATA_FILES["calibration"]).write_text("\n".join(sets.calibration) + "\n")
    (folder / DATA_FILES["heldout"]).write_text("\n".join(sets.heldout) + "\n")
    for name, items in (("hellaswag", sets.hellaswag), ("lambada", sets.lambada)):
        lines = [json.dumps(item, ensure_ascii=False) for item in items]
        (folder / DATA_FILES[name]).write_text("\n".join(lines) + "\n")
    info = {
        "generator_version": GENERATOR_VERSION,
        "generator_fingerprint": generator_fingerprint(),
        "counts": {
            "calibration": len(sets.calibration), "heldout": len(sets.heldout),
            "hellaswag": len(sets.hellaswag), "lambada": len(sets.lambada),
        },
    }
    (folder / DATA_MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _data_complete(folder: Path) -> bool:
    info = _read_json(folder / DATA_MARKER)
    return (
        info is not None
        and info.get("generator_version") == GENERATOR_VERSION
        and info.get("generator_fingerprint") == generator_fingerprint()
        and all((folder / f).is_file() for f in DATA_FILES.values())
    )


def ensure_toy_data(
    cache_dir: str | Path | None = None, *, force: bool = False,
    reporter: Reporter | None = None,
) -> Path:
    """The folder of the toy data files, generated (about a second) if missing."""
    reporter = reporter or NULL_REPORTER
    final = _data_dir(cache_dir)
    if not force and _data_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final, reporter):
        if not force and _data_complete(final):  # built by another process while we waited
            return final
        reporter.info(f"generating toy data files (generator v{GENERATOR_VERSION})")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the published folder is an ordinary one
        try:
            _write_data(tmp)
            _publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def toy_data_path(name: str, *, cache_dir: str | Path | None = None) -> Path:
    """Path of a toy data file, generating the files first if needed.

    ``name``: ``calibration`` / ``heldout`` (``.txt``, one document per line) or
    ``hellaswag`` / ``lambada`` (``.jsonl`` in the exact HellaSwag / LAMBADA schemas).
    """
    if name not in DATA_FILES:
        raise InvalidInput(f"unknown toy data file {name!r}; use one of {', '.join(DATA_FILES)}")
    return ensure_toy_data(cache_dir) / DATA_FILES[name]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def default_train_config(variant: str):
    """The training recipe of the cached toy model of ``variant``."""
    from cwa.toy.recipe import ToyTrainConfig

    return ToyTrainConfig(variant=variant)


def build_toy_model(
    folder: str | Path,
    variant: str = "gpt2",
    *,
    config=None,
    cache_dir: str | Path | None = None,
    reporter: Reporter | None = None,
) -> dict:
    """Train a toy model and save it (HF format + tokenizer + ``cwa_toy.json``) in ``folder``.

    ``config`` (a :class:`cwa.toy.recipe.ToyTrainConfig`) defaults to the cached recipe; tests
    pass fewer steps. The recorded task accuracies use the first ``config.eval_items`` items of
    each task file (none when 0). Returns the figures written to ``cwa_toy.json``. Not cached:
    :func:`ensure_toy_model` gives the cached default.
    """
    import torch
    import transformers

    from cwa.toy.language import iter_stories
    from cwa.toy.tasks import build_eval_sets
    from cwa.toy.tokenizer import build_toy_tokenizer
    from cwa.toy.train import task_accuracies, train_toy_model

    reporter = reporter or NULL_REPORTER
    cfg = config or default_train_config(_check_variant(variant))
    if cfg.variant != variant:
        raise InvalidInput(f"toy config is for {cfg.variant!r}, not {variant!r}; make them agree")
    start = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data_dir = ensure_toy_data(cache_dir, reporter=reporter)
    # The reserved texts are regenerated (deterministically) rather than read back, so the
    # training stream never depends on what happens to be on disk.
    reserved = build_eval_sets().reserved
    tokenizer = build_toy_tokenizer(cfg.seq_len)
    stream = (story.text for story in iter_stories("train", reserved))
    model, figures = train_toy_model(cfg, tokenizer, stream, reporter)
    if cfg.eval_items > 0:
        lambada = _read_jsonl(data_dir / DATA_FILES["lambada"])[: cfg.eval_items]
        hellaswag = _read_jsonl(data_dir / DATA_FILES["hellaswag"])[: cfg.eval_items]
        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:
            figures.update(task_accuracies(model, tokenizer, lambada, hellaswag))
        finally:
            torch.set_num_threads(threads)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    figures.update({
        "variant": variant,
        "generator_version": GENERATOR_VERSION,
        "generator_fingerprint": generator_fingerprint(),
        "seed": cfg.seed,
        "build_seconds": round(time.perf_counter() - start, 2),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    })
    (folder / MODEL_MARKER).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def _build_for_cache(
    folder: Path, variant: str, cfg, cache_dir: str | Path | None, reporter: Reporter
) -> dict:
    """Build the cached model in a child process (see :mod:`cwa.toy.worker` for why)."""
    from cwa.toy.worker import run_build_in_child

    return run_build_in_child(
        folder, variant, asdict(cfg), None if cache_dir is None else str(cache_dir), reporter
    )


def _model_status(folder: Path, variant: str) -> tuple[bool, dict | None]:
    """(usable, recorded figures): usable if complete and built by the current recipe."""
    info = _read_json(folder / MODEL_MARKER)
    if info is None:
        return False, None
    current = asdict(default_train_config(variant))
    fresh = (
        info.get("generator_version") == GENERATOR_VERSION
        and info.get("generator_fingerprint") == generator_fingerprint()
        and info.get("config") == current
    )
    return fresh and (folder / "config.json").is_file(), info


def ensure_toy_model(
    variant: str = "gpt2",
    *,
    cache_dir: str | Path | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> Path:
    """The cached toy model folder of ``variant`` (``gpt2`` or ``llama``), built if needed.

    The first build trains on the CPU for about a minute; later calls return at once. Rebuilt
    when the generator version or training recipe changed, or when ``force`` is true.
    """
    reporter = reporter or NULL_REPORTER
    _check_variant(variant)
    final = _variant_dir(variant, cache_dir)
    if not force and _model_status(final, variant)[0]:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final, reporter):
        if not force and _model_status(final, variant)[0]:
            return final
        reporter.info(f"building toy-{variant} (first use; about a minute on a CPU)")
        ensure_toy_data(cache_dir, reporter=reporter)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the published folder is an ordinary one
        try:
            _build_for_cache(tmp, variant, default_train_config(variant), cache_dir, reporter)
            _publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def toy_info(cache_dir: str | Path | None = None) -> dict:
    """Where the toy world lives, what is built, and the recorded training figures."""
    from cwa.toy.recipe import VARIANTS

    data = _data_dir(cache_dir)
    models = {}
    for variant in VARIANTS:
        folder = _variant_dir(variant, cache_dir)
        usable, figures = _model_status(folder, variant)
        models[variant] = {
            "path": str(folder),
            "built": usable,
            "stale": figures is not None and not usable,
            "figures": figures,
        }
    return {
        "cache_dir": str(toy_cache_dir(cache_dir)),
        "generator_version": GENERATOR_VERSION,
        "data": {
            "path": str(data),
            "built": _data_complete(data),
            "files": {name: str(data / f) for name, f in DATA_FILES.items()},
        },
        "models": models,
    }

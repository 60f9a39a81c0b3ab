"""Option parsing and answer-letter extraction (pipeline/choices.py)."""

import pytest

from pipeline.evaluation.choices import extract_choice, is_multiple_choice, parse_options

DRIVEBENCH_QUESTION = (
    "What is the moving status of object <c1,CAM_BACK,1088.3,497.5>? Please select the correct answer from "
    "the following options: A. Going ahead. B. Turn right. C. Turn left. D. Stopped."
)
OPTIONS = {"A": "Going ahead.", "B": "Turn right.", "C": "Turn left.", "D": "Stopped."}


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        (DRIVEBENCH_QUESTION, OPTIONS),
        (
            "Which colour is the light?\nA. Red\nB) Blue\n(C) Green\nAnswer with a letter.",
            {"A": "Red", "B": "Blue", "C": "Green"},
        ),
        ("Pick one:\n(A) yes\n(B) no", {"A": "yes", "B": "no"}),
        ("Choose: A: left lane B: right lane", {"A": "left lane", "B": "right lane"}),
        ("Is Plan A. safe? Options: A. x B. y C. z", {"A": "x", "B": "y", "C": "z"}),
        ("Out of order: B. one A. two", {}),
        ("Only one option A. here", {}),
        ("Is <c1,CAM_FRONT,0.46,0.67> moving? Answer yes or no.", {}),
        ("The U.S.A. is large.", {}),
        ("", {}),
    ],
)
def test_parse_options(question, expected):
    assert parse_options(question) == expected
    assert is_multiple_choice(question) == bool(expected)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Final: {A. Going ahead.}", "A"),
        ("C. The ego vehicle should stop", "C"),
        ("C) Turn left", "C"),
        ("(B)", "B"),
        ("[D]", "D"),
        ("B", "B"),
        ("b.", "B"),
        ("d", "D"),
        ("Answer: D", "D"),
        ("Answer: a", "A"),
        ("answer=(c)", "C"),
        ("The answer is C.", "C"),
        ("The correct answer is option B.", "B"),
        ("**B**", "B"),
        ("The answer is **D**.", "D"),
        ("**Answer:** C", "C"),
        ("I think it is (A) because the car ahead keeps moving.", "A"),
        ("I choose D because <c1,CAM_BACK,1088.3,497.5> is not moving.", "D"),
        ("B is correct.", "B"),
        ("B - Turn right", "B"),
        ("It's 'B'.", "B"),
        ("The vehicle is turning. So C.", "C"),
        ("Option A is wrong; the answer is C.", "C"),
        ("Answer: B\nExplanation: A pedestrian crosses in front.", "B"),
        ("C. <c1,CAM_FRONT,0.46,0.67> turns left, so the answer is C.", "C"),
        ("Going ahead.", "A"),
        ("going ahead", "A"),
        ("The answer is stopped.", "D"),
        ("Answer: Turn left", "C"),
        # negatives: no choice, or ambiguous
        ("<c1,CAM_FRONT,0.46,0.67> is a car.", None),
        ("<c3,CAM_BACK,0.1,0.2> and <c2,CAM_FRONT,0.3,0.4>", None),
        ("There is a car ahead.", None),
        ("A car is parked on the right.", None),
        ("answer: a car", None),
        ("e.g. a truck", None),
        ("A or B", None),
        ("Answer: A or B", None),
        ("The answer is A and C.", None),
        ("A, B", None),
        ("E", None),
        ("Answer: E", None),
        ("The vehicle is going ahead slowly.", None),
        ("None of the options fit.", None),
        ("I cannot tell.", None),
        ("", None),
        ("   ", None),
    ],
)
def test_extract_choice_with_options(answer, expected):
    assert extract_choice(answer, OPTIONS) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Answer: E", "E"),
        ("(B)", "B"),
        ("I think it is (A).", "A"),
        ("Going ahead.", None),  # text matching needs the options
        ("I saw it.", None),  # the pronoun I is not an option letter
        ("The answer is Z.", None),
    ],
)
def test_extract_choice_without_options(answer, expected):
    assert extract_choice(answer) == expected


def test_duplicate_option_texts_do_not_match_by_text():
    assert extract_choice("Red", {"A": "Red", "B": "red", "C": "Blue"}) is None


def test_letter_beats_option_text():
    assert extract_choice("B. Going ahead.", OPTIONS) == "B"

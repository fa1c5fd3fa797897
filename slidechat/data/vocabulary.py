"""The tasks' words: the questions the models are asked, their options and option letters.

Production vocabulary (screening asks these questions of real slides); the synthetic generators and
the tests import it from here.
"""

from __future__ import annotations

from typing import Tuple

#: The screening question (field: normal vs abnormal). Option B is the abnormal answer.
SCREENING_OPTIONS: Tuple[str, ...] = ("Normal", "Abnormal")
SCREENING_ABNORMAL_INDEX = 1
SCREENING_QUESTION = ("Please answer the multiple-choice question based on the image [Screening of "
                      "Cytology Field], and select the best option from the following options "
                      "[A.Normal, B.Abnormal]. Just answer the option.")
GROUND_ABNORMAL_QUESTION = "Locate all abnormal cells."
REPORT_QUESTION = "Describe the Cytology diagnosis results."
REGION_QUESTION = "Give a brief description of region."
TASKS: Tuple[str, ...] = ("mcq", "grounding", "region", "report", "screening")
#: option letters of every multiple-choice question (SlideBench, CytoChat MCQ, screening)
LETTERS = "ABCDEFGHIJ"

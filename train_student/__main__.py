"""``python -m train_student``: the student trainer (see train_student/train.py)."""

from train_student.train import main

main()

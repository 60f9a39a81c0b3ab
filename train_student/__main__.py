"""``python -m train_student`` / ``torchrun ... -m train_student``: the student trainer (train_student/train.py).

``record`` writes an unexpected exception of a rank to torchrun's error file, so torchrun's failure
summary shows it."""

from torch.distributed.elastic.multiprocessing.errors import record

from train_student.train import main

record(main)()

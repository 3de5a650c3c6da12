"""The parts of `quickstart.py`, one stage or concept per module.

settings   what the outputs depend on (`Settings`), the variants and a training run's key (`RunKey`)
corpus     stage 1: prose paragraphs from Python's own documentation
recipes    stages 3-6 as far as they depend on the teacher: one `Recipe` class per teacher
pipeline   the stages in order over the output folder, skipped when done
statistics the held-out metrics and the statistics over paired seeds
report     stage 7: the plots and summary.md
memory     each stage's peak memory; freed heap handed back between stages
"""

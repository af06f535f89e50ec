"""Training nested MatMamba-Vision encoders: the trainer (`train.py`), its data, a distillation teacher, model cards.

    python -m training.train --out runs/fmnist         # or `matsearch train`
"""

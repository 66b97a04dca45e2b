"""Evaluations of a pretrained encoder, in one package with one data path and one way to load a run's encoder
(`runs.load_encoder`):

- features: the frozen encoder's features and the kNN evaluation on them;
- linear: the fast linear probe on precomputed frozen features (`fastbyol eval --protocol features`);
- paper: the BYOL paper's ImageNet linear protocol, augmented views each epoch (`fastbyol eval --protocol paper`);
- finetune: semi-supervised fine-tuning on a class-balanced labelled subset (`fastbyol finetune`);
- probe: the online linear probe trained during pretraining (`fastbyol train --online-probe`);
- results: the JSON files these write into the run directory and the one table that gathers them.
"""

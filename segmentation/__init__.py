"""Semantic segmentation task: smp/transformers models, any HF segmentation dataset or the embedded
Fashion-MNIST canvases, mIoU under PGD and SegPGD."""

"""Preprocessing of structural MRI for ePVS segmentation: pure functions, thin nipype wrappers."""

"""ePVS segmentation: detectors, networks, synthetic data, training, inference, post-processing, metrics."""

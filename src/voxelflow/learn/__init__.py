"""Training, evaluation, the segmenter, devices and pictures."""

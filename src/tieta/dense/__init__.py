"""Dense prediction: semantic segmentation tasks, their transforms and metrics."""

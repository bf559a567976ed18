"""Detection datasets: the VOC and COCO readers (voc, coco), the synthetic generator (synthetic),
conversion between the two formats (convert), a description of a split (describe), and
loaders.open_splits, which opens a training and a test split of either kind with one class list."""

"""VOC-format datasets: the reader, the synthetic generator, and where generated data lives."""

"""Benchmarks of alr against torch.optim (run ``python -m bench``)."""

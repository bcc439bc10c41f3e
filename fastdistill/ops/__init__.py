"""Ops: launchers, torch.library custom ops with fake impls and autograd, and the backend choice per call."""

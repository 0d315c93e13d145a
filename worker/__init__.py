"""The worker side: the Langevin chain and replica update, the torch.optim optimizer, workloads
(models, datasets, evaluation), the worker loop and its transports."""

"""The runtime: the Pipeline facade, per-rank state, stage execution, links, the control
plane, migration, checkpoints and the process launcher (torch.distributed, gloo)."""

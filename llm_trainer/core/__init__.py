"""The bottom layer: device and dtype, durable files, the process group, checkpoints and run directories."""
